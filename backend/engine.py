"""The generation engine: a request queue, one engine thread, and handles that stream results.

Data path of one step: scheduler.schedule() picks the chunks -> runner.launch() lays them out, runs
the model (reference or TransformerEngine) and the sampler -> runner.complete() brings the sampled
ids to the host -> scheduler.update() appends the tokens and applies the stop rules -> each
request's handle gets its token delta. Text is made by the handle's reader, off this thread
(backend/outputs.py).

With async scheduling (on a GPU by default) the engine launches step N+1 before it completes step
N: while the GPU computes N, this thread schedules and lays out N+1 and then hands out N's tokens,
so the host's work per step hides behind the GPU's instead of adding to it. The price is one
wasted row per sequence that stops on a token (its next decode was already launched) and
admissions one step later; a batch holding a request with repetition, presence or frequency
penalties runs step by step, since those need every token on the host.
Nothing here knows about Triton; `model_repository/gemma/1/model.py` is a thin client of this API.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence as Seq, Union

import torch

from .errors import EngineOverloadedError, InvalidRequestError
from .kv_cache import CacheUsage, PagedKVCache
from .model import prepare_for_cpu
from .outputs import OutputProcessor, RequestOutput, TokenDelta
from .runner import ModelRunner, StepInFlight, StepModel
from .sampling import SamplingParams, make_generator, needs_token_history
from .scheduler import PrefixCacheStats, Scheduler, SchedulerOutput, Sequence
from .self_check import load_checked_tokenizer
from .step_times import StepTimes
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    checkpoint: Optional[str] = None  # HF Gemma checkpoint dir; None: the packaged Gemma 3 270M
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU (matches the HF reference exactly)
    device: str = "auto"  # auto: cuda if available, else cpu
    engine: str = "auto"  # auto: TransformerEngine on CUDA when importable, else the torch reference
    kv_cache_bytes: int = 1 << 30
    block_size: int = 16
    max_num_seqs: int = 16  # sequences decoding together
    max_model_len: int = 8192  # prompt + generated tokens (capped by the model's positions)
    max_num_batched_tokens: int = 512  # tokens per step: bounds prefill chunks
    max_queue_size: int = 256  # waiting requests beyond this are refused (EngineOverloadedError)
    enable_prefix_caching: bool = True  # reuse the K/V of full blocks of earlier prompts and outputs
    fp8: bool = False  # TE only: FP8 GEMMs on Hopper
    fp8_recipe: str = "delayed"  # delayed | current | block (backend.te.model.make_fp8_recipe)
    fp8_lm_head: bool = False  # with fp8: the tied LM head in FP8 too (half its bytes per step, FP8 logits)
    cuda_graphs: bool = True  # GPU: decode steps (and the TE model's mixed steps) replay captured CUDA graphs
    async_scheduling: str = "auto"  # on: launch step N+1 before step N's tokens are back; auto: on for CUDA


@dataclass(frozen=True)
class EngineStats:
    kv_cache: CacheUsage
    num_running: int
    num_waiting: int
    prefix_cache: PrefixCacheStats
    num_preemptions: int  # since the engine started
    step_times: StepTimes  # where the steps' time went, since the engine started


class RequestHandle:
    """One submitted request. The engine thread appends its token deltas; whoever reads them (poll,
    or iterate) turns them into text in their own thread. Cancel any time."""

    def __init__(self, engine: "Engine", seq: Sequence, processor: OutputProcessor,
                 on_ready: Optional[Callable[["RequestHandle"], None]]):
        self._engine, self._seq, self._processor, self._on_ready = engine, seq, processor, on_ready
        self._deltas: list[TokenDelta] = []
        self._arrived = threading.Condition()
        self.request_id = seq.request_id
        self.num_prompt_tokens = seq.num_prompt_tokens

    def cancel(self) -> None:
        self._engine._finish_early(self._seq, "cancelled")

    def poll(self) -> Optional[RequestOutput]:
        """Everything generated since the last poll as one output (None if nothing new). Call
        from one thread at a time. A stop string found here stops the sequence in the engine."""
        with self._arrived:
            deltas, self._deltas = self._deltas, []
        out = self._processor.process(deltas)
        if out is not None and self._processor.stopped_by_text:
            self._engine._finish_early(self._seq, "stop")
        return out

    def __iter__(self) -> Iterator[RequestOutput]:
        while True:
            with self._arrived:
                self._arrived.wait_for(lambda: self._deltas)
            out = self.poll()
            if out is not None:
                yield out
                if out.finish_reason is not None:
                    return

    def result(self) -> RequestOutput:
        """Block until finished; one output holding the whole completion."""
        return functools.reduce(RequestOutput.followed_by, self)

    def _deliver(self, delta: TokenDelta) -> None:  # engine thread
        with self._arrived:
            first_unread = not self._deltas
            self._deltas.append(delta)
            self._arrived.notify()
        # One notice per batch of unread deltas: a reader that falls behind is told once and then
        # takes everything at its next poll (no per-token wake-ups, no per-token detokenizing).
        if first_unread and self._on_ready is not None:
            try:
                self._on_ready(self)
            except Exception:  # a broken consumer must not take the engine down
                log.exception("on_ready callback failed for request %d", self.request_id)


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda if available, else cpu; "cuda" -> the current CUDA device, with its index (the
    engine thread selects it with torch.cuda.set_device, which refuses an index-less device)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def load_model(config: EngineConfig, path: Path, device: torch.device, dtype: torch.dtype):
    """The TransformerEngine model on CUDA when available (or asked for), else the reference."""
    use_te = config.engine == "te"
    if config.engine == "auto" and device.type == "cuda":
        from .te import te_available
        use_te = te_available()
    if use_te:
        from .te.runner import load_te_model
        return load_te_model(path, dtype, device, fp8=config.fp8, fp8_recipe=config.fp8_recipe,
                             fp8_lm_head=config.fp8_lm_head)
    if config.engine not in ("auto", "torch", "te"):
        raise ValueError(f"engine must be auto, te or torch, not {config.engine!r}")
    from .weights import load_reference_model
    model, _ = load_reference_model(path, dtype, device)
    return prepare_for_cpu(model) if device.type == "cpu" and dtype == torch.float32 else model


class Engine:
    def __init__(self, build_model: Callable[[], StepModel], tokenizer: Tokenizer, config: EngineConfig,
                 device: torch.device):
        """`build_model` runs on the engine thread, which then owns every torch op of the engine.
        Measured on the 2-core CPU: a model whose weights were loaded by another thread (whose OpenMP
        team then exists too) decodes ~10% slower (Gemma 3 270M: 64-70 vs 59-61 ms per step)."""
        self.tokenizer, self.config, self.device = tokenizer, config, device
        self._lock = threading.Condition()
        self._submitted: list[Sequence] = []
        self._finish_requests: list[tuple[Sequence, str]] = []  # cancellations, stop strings found
        self._handles: dict[int, RequestHandle] = {}  # request id -> handle, while it runs or waits
        self._next_id = 0
        self._num_preemptions = 0
        self._step_times = StepTimes()  # written by the engine thread; stats() copies it
        self._stopping = False
        started: list = []  # what the engine thread set up, or the exception it raised
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(build_model, started, ready),
                                        name="gemma-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if isinstance(started[0], BaseException):
            raise started[0]

    def _setup(self, build_model) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # a new thread starts on cuda:0
        model = build_model()
        cfg = model.cfg
        self.vocab_size = cfg.vocab_size
        self.max_model_len = min(self.config.max_model_len, cfg.max_position_embeddings)
        self.kv_cache = PagedKVCache.from_budget(cfg, self.config.kv_cache_bytes, self.config.block_size, model.dtype,
                                                 self.device, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv_cache.pool, self.config.block_size, self.config.max_num_seqs,
                                   self.config.max_num_batched_tokens)
        self.runner = ModelRunner(model, self.kv_cache, self.config.max_num_seqs, self.config.max_num_batched_tokens,
                                  self.max_model_len, self.config.cuda_graphs)
        self.runner.warm_up()
        if self.config.async_scheduling not in ("auto", "on", "off"):
            raise ValueError(f"async_scheduling must be auto, on or off, not {self.config.async_scheduling!r}")
        self._async = self.config.async_scheduling == "on" or (
            self.config.async_scheduling == "auto" and self.device.type == "cuda")

    @classmethod
    def from_config(cls, config: EngineConfig) -> "Engine":
        if config.checkpoint:
            path = Path(config.checkpoint)
        else:
            from .default_model import ensure_default_checkpoint
            path = ensure_default_checkpoint()
        device = resolve_device(config.device)
        if config.dtype == "auto":
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        elif config.dtype in DTYPES:
            dtype = DTYPES[config.dtype]
        else:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, not {config.dtype!r}")
        return cls(lambda: load_model(config, path, device, dtype), load_checked_tokenizer(path), config, device)

    # --- API (any thread) -------------------------------------------------------------------------

    def submit(self, prompt: Union[str, Seq[int]], params: SamplingParams,
               on_ready: Optional[Callable[[RequestHandle], None]] = None) -> RequestHandle:
        """Queue a request. With `on_ready`, the engine thread calls on_ready(handle) whenever the
        request has new output, for the caller to `poll()` (from its own thread)."""
        if isinstance(prompt, str) and not prompt:
            raise InvalidRequestError("prompt is empty")
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check_fits(prompt_ids, params)
        processor = OutputProcessor(self.tokenizer, prompt_ids, params)
        with self._lock:
            if self._stopping:
                raise EngineOverloadedError("the engine is shutting down")
            # Requests the engine thread has not admitted yet count as waiting only beyond the free
            # running slots: a burst that fits the batch is never refused.
            not_admitted = len(self.scheduler.waiting) + len(self._submitted)
            free_slots = self.config.max_num_seqs - len(self.scheduler.running)
            if not_admitted - free_slots >= self.config.max_queue_size:
                raise EngineOverloadedError(
                    f"{self.config.max_queue_size} requests are already waiting; retry later")
            seq = Sequence(
                request_id=self._next_id, token_ids=prompt_ids, num_prompt_tokens=len(prompt_ids), params=params,
                # Unseeded requests share the global RNG (one batched draw); a seed gets its own
                # generator so its output does not depend on what else is in the batch.
                generator=None if params.seed is None else make_generator(params.seed, self.device),
                eos_token_ids=self.tokenizer.eos_token_ids)
            handle = RequestHandle(self, seq, processor, on_ready)
            self._handles[seq.request_id] = handle
            self._next_id += 1
            self._submitted.append(seq)
            self._lock.notify()
        return handle

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(self.kv_cache.usage(), len(self.scheduler.running),
                               len(self.scheduler.waiting) + len(self._submitted), self.scheduler.prefix_cache,
                               self._num_preemptions, dataclasses.replace(self._step_times))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel everything in flight (each gets a final "cancelled" output) and stop the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout)

    def _finish_early(self, seq: Sequence, reason: str) -> None:
        """Ask the engine thread to end `seq` (cancelled, or a stop string found by its reader)."""
        with self._lock:
            if seq.finish_reason is None:
                self._finish_requests.append((seq, reason))
                self._lock.notify()

    def _check_fits(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                f"the context of {self.max_model_len} tokens")
        # A sequence alone must fit the cache: then preempting newer ones always lets the oldest finish.
        if self.kv_cache.blocks_for(total) > self.kv_cache.pool.num_blocks:
            raise InvalidRequestError(f"prompt + max_tokens = {total} tokens exceeds the whole KV cache "
                                      f"({self.kv_cache.pool.num_blocks * self.kv_cache.block_size} tokens)")
        if max(prompt_ids) >= self.vocab_size or min(prompt_ids) < 0:
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})")
        if any(t >= self.vocab_size for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be in [0, {self.vocab_size})")

    # --- engine thread ----------------------------------------------------------------------------

    def _run(self, build_model, started: list, ready: threading.Event) -> None:
        try:
            self._setup(build_model)
            started.append(True)
        except BaseException as exc:  # handed to the constructor, which raises it
            started.append(exc)
            return
        finally:
            ready.set()
        self._loop()

    def _loop(self) -> None:
        in_flight: Optional[StepInFlight] = None  # launched, its tokens not handed out yet
        while True:
            with self._lock:
                while in_flight is None and not (self._submitted or self._finish_requests or self._stopping
                                                 or self.scheduler.has_work()):
                    self._lock.wait()
                for seq in self._submitted:
                    self.scheduler.add(seq)
                self._submitted.clear()
                finish_requests, self._finish_requests = self._finish_requests, []
                stopping = self._stopping
            for seq, reason in finish_requests:
                if seq.finish_reason is None:
                    self._finish(seq, reason)
            if in_flight is not None and (stopping or not self._async or self._needs_every_token()):
                self._complete(in_flight)
                in_flight = None
            if stopping:
                for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
                    self._finish(seq, "cancelled")
                return
            launched = self._launch(in_flight)
            if in_flight is not None:
                self._complete(in_flight)
            in_flight = launched

    def _needs_every_token(self) -> bool:
        """A running request's sampler needs its tokens so far on the host (penalties): the next
        step waits for the one in flight."""
        return any(seq.num_in_flight and needs_token_history(seq.params) for seq in self.scheduler.running)

    def _launch(self, previous: Optional[StepInFlight]) -> Optional[StepInFlight]:
        """Schedule and launch the next step (None if nothing could be scheduled, or it failed)."""
        start = time.perf_counter()
        output = self.scheduler.schedule()
        self._num_preemptions += len(output.preempted)
        if not output.chunks:
            return None
        self._step_times.schedule_s += time.perf_counter() - start
        try:
            return self.runner.launch(output, previous, self._step_times)
        except Exception as exc:  # a fault fails this step's requests; the engine keeps serving
            self._fail_step(output, exc)
            return None

    def _complete(self, step: StepInFlight) -> None:
        """Wait for a launched step's tokens, apply them and hand each request its delta."""
        try:
            sampled = self.runner.complete(step, self._step_times)
        except Exception as exc:
            self._fail_step(step.output, exc)
            return
        updating = time.perf_counter()
        output = step.output
        samplers = [scheduled.seq for scheduled in output.chunks if scheduled.needs_logits]
        for row in sampled.failed_rows:  # only these requests fail; the rest of the batch goes on
            self._finish(samplers[row], "error", error="the model's scores for this request were not finite "
                                                       "(NaN or infinity): nothing could be sampled")
        for seq, i in self.scheduler.update(output, sampled.token_ids):
            logprobs = sampled.logprobs[i]
            self._deliver(seq, TokenDelta([sampled.token_ids[i]], seq.finish_reason,
                                          num_cached_tokens=seq.num_cached_prompt_tokens,
                                          logprobs=None if logprobs is None else [logprobs]))
        self._step_times.update_s += time.perf_counter() - updating

    def _fail_step(self, output: SchedulerOutput, exc: Exception) -> None:
        log.error("engine step failed", exc_info=exc)
        for scheduled in output.chunks:
            self._finish(scheduled.seq, "error", error=f"{type(exc).__name__}: {exc}")

    def _finish(self, seq: Sequence, reason: str, error: Optional[str] = None) -> None:
        if seq.finish_reason is not None:  # already ended (e.g. cancelled while its step ran)
            return
        self.scheduler.finish(seq, reason)
        self._deliver(seq, TokenDelta([], reason, error, seq.num_cached_prompt_tokens))

    def _deliver(self, seq: Sequence, delta: TokenDelta) -> None:
        if delta.finish_reason is not None:
            with self._lock:
                handle = self._handles.pop(seq.request_id)
        else:
            handle = self._handles[seq.request_id]
        handle._deliver(delta)
