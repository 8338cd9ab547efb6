"""The generation engine: a request queue, one engine thread, and handles that stream results.

Data path of one step (`Engine._step`): scheduler picks the work -> batch.build_step lays it out ->
model forward (reference or TransformerEngine) -> sampler -> detokenizer / stop checks -> outputs.
Nothing here knows about Triton; `model_repository/gemma/1/model.py` is a thin client of this API.
"""
from __future__ import annotations

import functools
import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence as Seq, Union

import torch

from .batch import build_step
from .errors import EngineOverloadedError, InvalidRequestError
from .kv_cache import CacheUsage, PagedKVCache
from .model import prepare_for_cpu
from .sampling import SamplingParams, SamplingRow, make_generator, sample
from .scheduler import Scheduler, Sequence
from .self_check import load_checked_tokenizer
from .tokenizer import TextStream, Tokenizer

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
    fp8: bool = False  # TE only: FP8 GEMMs on Hopper


@dataclass(frozen=True)
class RequestOutput:
    text: str  # new text since the previous output
    token_ids: list[int]  # new token ids since the previous output
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: Optional[str] = None  # None while running: "stop", "length", "cancelled", "error"
    error: Optional[str] = None

    def followed_by(self, later: "RequestOutput") -> "RequestOutput":
        """This output and the request's next one as a single output (for a consumer that fell
        behind and delivers what has accumulated at once)."""
        return RequestOutput(self.text + later.text, self.token_ids + later.token_ids, later.num_prompt_tokens,
                             later.num_output_tokens, later.finish_reason, later.error)


@dataclass(frozen=True)
class EngineStats:
    kv_cache: CacheUsage
    num_running: int
    num_waiting: int


class RequestHandle:
    """One submitted request: iterate for its outputs (unless a callback took them), cancel any time."""

    def __init__(self, engine: "Engine", seq: Sequence, outputs: Optional[queue.Queue]):
        self._engine, self._seq, self._outputs = engine, seq, outputs
        self.request_id = seq.request_id
        self.num_prompt_tokens = seq.num_prompt_tokens

    def cancel(self) -> None:
        self._engine._cancel(self._seq)

    def __iter__(self) -> Iterator[RequestOutput]:
        if self._outputs is None:
            raise RuntimeError("this request delivers its outputs to the on_output callback")
        while True:
            out = self._outputs.get()
            yield out
            if out.finish_reason is not None:
                return

    def result(self) -> RequestOutput:
        """Block until finished; one output holding the whole completion."""
        return functools.reduce(RequestOutput.followed_by, self)


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
        return load_te_model(path, dtype, device, fp8=config.fp8)
    if config.engine not in ("auto", "torch", "te"):
        raise ValueError(f"engine must be auto, te or torch, not {config.engine!r}")
    from .weights import load_reference_model
    model, _ = load_reference_model(path, dtype, device)
    return prepare_for_cpu(model) if device.type == "cpu" and dtype == torch.float32 else model


class Engine:
    def __init__(self, build_model: Callable[[], torch.nn.Module], tokenizer: Tokenizer, config: EngineConfig,
                 device: torch.device):
        """`build_model` runs on the engine thread, which then owns every torch op of the engine.
        Measured on the 2-core CPU: a model whose weights were loaded by another thread (whose OpenMP
        team then exists too) decodes ~10% slower (Gemma 3 270M: 64-70 vs 59-61 ms per step)."""
        self.tokenizer, self.config, self.device = tokenizer, config, device
        self._lock = threading.Condition()
        self._submitted: list[Sequence] = []
        self._cancelled: list[Sequence] = []
        self._next_id = 0
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
        self.model = build_model()
        cfg = self.model.cfg
        self.max_model_len = min(self.config.max_model_len, cfg.max_position_embeddings)
        dtype = next(self.model.parameters()).dtype
        self.kv_cache = PagedKVCache.from_budget(cfg, self.config.kv_cache_bytes, self.config.block_size, dtype,
                                                 self.device)
        self.scheduler = Scheduler(self.kv_cache, self.config.max_num_seqs, self.config.max_num_batched_tokens)
        self._windows = {layer.sliding_window for layer in cfg.layers}
        warm_up = getattr(self.model, "warm_up", None)  # the TE model captures its CUDA graphs here
        if warm_up is not None:
            warm_up(self.kv_cache, self.config.max_num_seqs, self.max_model_len)

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
               on_output: Optional[Callable[[RequestOutput], None]] = None) -> RequestHandle:
        if isinstance(prompt, str) and not prompt:
            raise InvalidRequestError("prompt is empty")
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check_fits(prompt_ids, params)
        outputs = None
        if on_output is None:
            outputs = queue.Queue()
            on_output = outputs.put
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
                request_id=self._next_id, token_ids=prompt_ids, num_prompt_tokens=len(prompt_ids),
                # Unseeded requests share the global RNG (one batched draw); a seed gets its own
                # generator so its output does not depend on what else is in the batch.
                params=params, generator=None if params.seed is None else make_generator(params.seed, self.device),
                text_stream=TextStream(self.tokenizer, prompt_ids, params.stop, min_tokens=params.min_tokens),
                on_output=on_output)
            self._next_id += 1
            self._submitted.append(seq)
            self._lock.notify()
        return RequestHandle(self, seq, outputs)

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(self.kv_cache.usage(), len(self.scheduler.running),
                               len(self.scheduler.waiting) + len(self._submitted))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel everything in flight (each gets a final "cancelled" output) and stop the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout)

    def _cancel(self, seq: Sequence) -> None:
        with self._lock:
            if seq.finish_reason is None and not seq.cancel_requested:
                seq.cancel_requested = True
                self._cancelled.append(seq)
                self._lock.notify()

    def _check_fits(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                f"the context of {self.max_model_len} tokens")
        if self.kv_cache.blocks_for(total) > self.kv_cache.pool.num_blocks:
            raise InvalidRequestError(f"prompt + max_tokens = {total} tokens exceeds the whole KV cache "
                                      f"({self.kv_cache.pool.num_blocks * self.kv_cache.block_size} tokens)")
        vocab = self.model.cfg.vocab_size
        if max(prompt_ids) >= vocab or min(prompt_ids) < 0:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab})")

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
        while True:
            with self._lock:
                while not (self._submitted or self._cancelled or self._stopping or self.scheduler.has_work()):
                    self._lock.wait()
                self.scheduler.waiting.extend(self._submitted)
                self._submitted.clear()
                cancelled, self._cancelled = self._cancelled, []
                stopping = self._stopping
            for seq in cancelled:
                if seq.finish_reason is None:
                    self._finish(seq, "cancelled")
            if stopping:
                for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
                    self._finish(seq, "cancelled")
                return
            self.scheduler.admit()
            self._step()

    def _step(self) -> None:
        work = self.scheduler.schedule()
        if not work:
            return
        try:
            token_ids, layout = build_step([chunk for _, chunk in work], self.kv_cache.block_size,
                                           self._windows, self.device)
            logits = self.model(token_ids, layout, self.kv_cache)
            for seq, chunk in work:
                seq.num_computed += len(chunk.token_ids)
            sampling = [seq for seq, chunk in work if chunk.needs_logits]
            rows = [SamplingRow(s.params, s.generator, s.token_ids, s.num_output_tokens, self.tokenizer.eos_token_ids)
                    for s in sampling]
            new_tokens = sample(logits, rows) if rows else []
        except Exception as exc:  # a fault fails this step's requests; the engine keeps serving
            log.exception("engine step failed")
            for seq, _ in work:
                self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
            return
        for seq, token in zip(sampling, new_tokens):
            self._append_token(seq, token)

    def _append_token(self, seq: Sequence, token: int) -> None:
        params = seq.params
        seq.token_ids.append(token)
        seq.pending_token_ids.append(token)
        may_stop = seq.num_output_tokens >= params.min_tokens
        if may_stop and (token in params.stop_token_ids or
                         (token in self.tokenizer.eos_token_ids and not params.ignore_eos)):
            return self._finish(seq, "stop")
        text = seq.text_stream.push(token)
        if seq.text_stream.stopped:
            return self._finish(seq, "stop", text)
        if seq.num_output_tokens >= params.max_tokens:
            return self._finish(seq, "length", text)
        if text:
            self._emit(seq, text)

    def _finish(self, seq: Sequence, reason: str, text: str = "", error: Optional[str] = None) -> None:
        self.scheduler.finish(seq, reason)
        if reason in ("stop", "length"):
            text += seq.text_stream.finish()
        self._emit(seq, text, error)

    def _emit(self, seq: Sequence, text: str, error: Optional[str] = None) -> None:
        out = RequestOutput(text, seq.pending_token_ids, seq.num_prompt_tokens, seq.num_output_tokens,
                            seq.finish_reason, error)
        seq.pending_token_ids = []
        try:
            seq.on_output(out)
        except Exception:  # a broken consumer must not take the engine down
            log.exception("on_output callback failed for request %d", seq.request_id)
