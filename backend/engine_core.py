"""The engine core: token ids in, token deltas out. A scheduler, a model runner and the loop of one
engine thread; no tokenizer, no text, no request handles (those are the front's: backend/engine.py).

Data path of one step: scheduler.schedule() picks the chunks -> runner.launch() lays them out, runs
the model (reference or TransformerEngine) and the sampler -> runner.complete() brings the sampled
ids to the host -> scheduler.update() appends the tokens and applies the stop rules -> a constrained
sequence's grammar accepts its token -> each loop's token deltas go to `publish` at once. A request
with structured outputs waits for its grammar to compile (backend/grammar.py, beside this loop)
before it joins the scheduler. With speculative decoding (EngineConfig.speculative_config), the
proposer guesses each speculating sequence's next tokens before the step is scheduled (n-gram lookup,
or a draft model's forwards: backend/draft_model.py), and the step verifies them
(backend/speculative.py).

With async scheduling (on a GPU by default) the core launches step N+1 before it completes step
N: while the GPU computes N, this thread schedules and lays out N+1 and then hands out N's tokens,
so the host's work per step hides behind the GPU's instead of adding to it. The price is one
wasted row per sequence that stops on a token (its next decode was already launched) and
admissions one step later; a batch holding a request with repetition, presence or frequency
penalties, bad words of several tokens, or a grammar, runs step by step, since those need every
token on the host; so does one holding a speculating sequence (its drafts are proposed from its
tokens so far, and its verify step yields a number of tokens known only on the host). A sequence
whose speculation pauses (its drafts do not pay for what they cost: backend/speculative.py) lets
the steps overlap again.

The core runs on a thread of the front's process, or in a process of its own (backend/engine_process.py
starts one there and talks to it through pipes); the front cannot tell the two apart.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .draft_model import check_draft_checkpoint, draft_proposer
from .grammar import Grammar, GrammarCompiler, PendingGrammar
from .kv_cache import CacheUsage, PagedKVCache, kv_cache_budget
from .model import prepare_for_cpu
from .outputs import RequestPhases, TokenDelta
from .params import EngineConfig, EngineLimits, SamplingParams
from .runner import ModelRunner, StepInFlight, StepModel
from .sampling import make_generator
from .scheduler import PrefixCacheStats, Scheduler, SchedulerOutput, Sequence
from .speculative import DraftControl, DraftRequest, NgramProposer, Proposer, SpecDecodeStats
from .step_times import StepTimes

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Publish = Callable[[list[tuple[int, TokenDelta]]], None]  # each loop's (request id, delta) pairs


@dataclass(frozen=True)
class EngineStats:
    kv_cache: CacheUsage
    num_running: int
    num_waiting: int
    prefix_cache: PrefixCacheStats
    num_preemptions: int  # since the engine started
    step_times: StepTimes  # where the steps' time went, since the engine started
    spec_decode: SpecDecodeStats = SpecDecodeStats()  # speculative decoding's drafts, since the engine started
    draft_kv_cache: Optional[CacheUsage] = None  # a draft model's own KV cache (speculative method draft_model)


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda if available, else cpu; "cuda" -> the current CUDA device, with its index (the
    engine thread selects it with torch.cuda.set_device, which refuses an index-less device)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on CUDA, float32 on the CPU (where it matches the HF reference exactly)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_model(config: EngineConfig, path: Path, device: torch.device, dtype: torch.dtype) -> StepModel:
    """The TransformerEngine model on CUDA when available (or asked for), else the reference."""
    use_te = config.engine == "te"
    if config.engine == "auto" and device.type == "cuda":
        from .te import te_available  # looks for TE without importing it: the CPU path never does
        use_te = te_available()
    if use_te:
        from .te.runner import load_te_model
        return load_te_model(path, dtype, device, fp8=config.fp8, fp8_recipe=config.fp8_recipe,
                             fp8_lm_head=config.fp8_lm_head)
    from .weights import load_reference_model
    model, _ = load_reference_model(path, dtype, device)
    return prepare_for_cpu(model) if device.type == "cpu" and dtype == torch.float32 else model


class EngineCore:
    """The engine thread and what it owns. `config.checkpoint` is a resolved checkpoint directory
    (backend/loader.py resolves the default model and checks it before anything starts)."""

    # As an engine process's front sees it (backend/engine_process.py): one front, whose request ids
    # start at 0, who started the engine and who reports the engine's own metrics.
    request_id_base = 0
    started_here = True
    reports_engine_stats = True

    def __init__(self, config: EngineConfig, eos_token_ids: frozenset[int], publish: Publish):
        """Builds the model on the engine thread, which then owns every torch op of the engine.
        Measured on the 2-core CPU: a model whose weights were loaded by another thread (whose OpenMP
        team then exists too) decodes ~10% slower (Gemma 3 270M: 64-70 vs 59-61 ms per step).
        Returns once the model is loaded and warmed up (its CUDA graphs captured); a failed start raises."""
        self.config, self.eos_token_ids, self._publish = config, eos_token_ids, publish
        self.device = resolve_device(config.device)
        self._lock = threading.Condition()
        self._closed = False
        self._submitted: list[Sequence] = []
        self._end_requests: list[tuple[int, str]] = []  # cancellations, stop strings found
        self._sequences: dict[int, Sequence] = {}  # request id -> sequence, until it finishes (engine thread)
        # Those of them whose sampler or proposer may need every token on the host: the few that
        # _needs_every_token reads each loop instead of every running sequence (engine thread).
        self._host_token_readers: set[Sequence] = set()
        self._compiling: dict[Sequence, PendingGrammar] = {}  # waiting for their grammar (engine thread)
        self._outbox: list[tuple[int, TokenDelta]] = []  # this loop's deltas (engine thread)
        self._stepped = False  # a step completed in this loop (engine thread)
        self._num_preemptions = 0
        self._step_times = StepTimes()  # written by the engine thread; stats() copies it
        self._spec_decode = SpecDecodeStats()
        self._speculative = config.speculative()
        self._proposer: Optional[Proposer] = None  # made on the engine thread (a draft model is loaded there)
        self._draft_kv_cache: Optional[PagedKVCache] = None
        # How many drafts each sequence proposes, from what drafts cost this engine's steps (timed from
        # launch to tokens applied, less the proposer's time: `_timed_step`) and how often they are accepted.
        self._draft_control = None if self._speculative is None else \
            DraftControl(self._speculative.num_speculative_tokens)
        self._timed_step: Optional[tuple[SchedulerOutput, float, float]] = None  # (output, launched at, proposing s)
        started: list = []  # what the engine thread set up, or the exception it raised
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started, ready), name="gemma-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if isinstance(started[0], BaseException):
            raise started[0]

    def _setup(self) -> None:
        config = self.config
        self._async = config.async_scheduling == "on" or (config.async_scheduling == "auto"
                                                            and self.device.type == "cuda")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # a new thread starts on cuda:0
        model = load_model(config, Path(config.checkpoint), self.device, resolve_dtype(config.dtype, self.device))
        cfg = model.cfg
        max_model_len = min(config.max_model_len, cfg.max_position_embeddings)
        # Sized here, once the weights are in: the warm-up below captures CUDA graphs that address
        # the cache, so it cannot come first, and no profiling forward runs before it. So unlike
        # vLLM, which profiles a step first, gpu_memory_utilization does not count a step's
        # activations, the graphs' pools or a draft model (loaded below): they come on top of it.
        budget = kv_cache_budget(config, cfg, model.dtype, self.device, max_model_len)
        self.kv_cache = PagedKVCache.from_budget(cfg, budget, config.block_size, model.dtype,
                                                 self.device, config.enable_prefix_caching)
        self.limits = EngineLimits(cfg.vocab_size, max_model_len, self.kv_cache.pool.num_blocks, config.block_size)
        self.scheduler = Scheduler(self.kv_cache.pool, config.block_size, config.max_num_seqs,
                                   config.max_num_batched_tokens)
        self.runner = ModelRunner(model, self.kv_cache, config.max_num_seqs, config.max_num_batched_tokens,
                                  max_model_len, config.cuda_graphs,
                                  0 if self._speculative is None else self._speculative.num_speculative_tokens)
        self.runner.warm_up()
        if self._speculative is not None:
            self._proposer = self._make_proposer(model, max_model_len)
        self._grammars = GrammarCompiler(Path(config.checkpoint) / "tokenizer.json", cfg.vocab_size,
                                         self.eos_token_ids, on_done=self._wake)

    def _make_proposer(self, model: StepModel, max_model_len: int) -> Proposer:
        """The n-gram proposer, or a draft model checked against the target and loaded like it."""
        spec = self._speculative
        if spec.method == "ngram":
            return NgramProposer(spec)
        path = Path(spec.model)
        check_draft_checkpoint(path, model.cfg, Path(self.config.checkpoint), max_model_len)
        draft = draft_proposer(load_model(self.config, path, self.device, model.dtype), self.config,
                               self.kv_cache.pool.num_blocks, max_model_len)
        self._draft_kv_cache = draft.kv_cache
        return draft

    # --- API (any thread) -------------------------------------------------------------------------

    def add(self, request_id: int, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request the front has checked and numbered."""
        # Constrained sequences do not speculate: their grammar would have to check every draft.
        speculates = self._proposer is not None and params.speculate and params.structured_outputs is None
        with self._lock:
            self._submitted.append(Sequence(
                request_id=request_id, token_ids=prompt_ids, num_prompt_tokens=len(prompt_ids), params=params,
                # Unseeded requests share the global RNG (one batched draw); a seed gets its own
                # generator so its output does not depend on what else is in the batch.
                generator=None if params.seed is None else make_generator(params.seed, self.device),
                eos_token_ids=self.eos_token_ids,
                speculation=self._draft_control.start(self._proposer.start(prompt_ids)) if speculates else None))
            self._lock.notify()

    def end(self, request_id: int, reason: str) -> None:
        """End a request early: "cancelled", or "stop" for a stop string the front found."""
        with self._lock:
            self._end_requests.append((request_id, reason))
            self._lock.notify()

    def stats(self) -> EngineStats:
        with self._lock:
            num_waiting = len(self.scheduler.waiting) + len(self._submitted) + len(self._compiling)
            return EngineStats(self.kv_cache.usage(), len(self.scheduler.running), num_waiting,
                               self.scheduler.prefix_cache,
                               self._num_preemptions, dataclasses.replace(self._step_times),
                               self._spec_decode if self._draft_control is None else
                               dataclasses.replace(self._spec_decode,
                                                   draft_cost=self._draft_control.draft_cost(len(self.scheduler.running))),
                               None if self._draft_kv_cache is None else self._draft_kv_cache.usage())

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel everything in flight (each gets a final "cancelled" delta) and stop the thread."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout)
        self._grammars.shutdown()

    def _wake(self) -> None:
        """A grammar finished compiling: the loop admits its sequence (or fails it)."""
        with self._lock:
            self._lock.notify()

    # --- engine thread ----------------------------------------------------------------------------

    def _run(self, started: list, ready: threading.Event) -> None:
        try:
            self._setup()
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
                while in_flight is None and not (self._submitted or self._end_requests or self._closed
                                                 or self.scheduler.has_work() or self._grammar_news()):
                    self._lock.wait(self._next_grammar_deadline())
                for seq in self._submitted:
                    # Each front refuses beyond the queue bound what it submits itself; fronts sharing
                    # this engine (backend/engine_fronts.py) could together exceed it.
                    if self.config.queue_is_full(len(self._sequences)):
                        self._refuse(seq)
                        continue
                    self._sequences[seq.request_id] = seq
                    if (seq.params.reads_token_history or seq.params.structured_outputs is not None
                            or seq.speculation is not None):
                        self._host_token_readers.add(seq)
                    if seq.params.structured_outputs is None:
                        self.scheduler.add(seq)
                    else:
                        self._compiling[seq] = self._grammars.compile(seq.params.structured_outputs,
                                                                      self.config.grammar_compile_timeout_s)
                self._submitted.clear()
                self._admit_compiled()
                end_requests, self._end_requests = self._end_requests, []
                stopping = self._closed
            for request_id, reason in end_requests:
                seq = self._sequences.get(request_id)
                if seq is not None:
                    self._finish(seq, reason)
            if in_flight is not None and (stopping or not self._async or self._needs_every_token()):
                self._complete(in_flight)
                in_flight = None
                self._flush()  # its tokens go out now, not after the next launch (on a CPU, a whole step)
            if stopping:
                for seq in list(self.scheduler.running) + list(self.scheduler.waiting) + list(self._compiling):
                    self._finish(seq, "cancelled")
                self._flush()
                return
            launched = self._launch(in_flight)
            if in_flight is not None:
                self._complete(in_flight)
            in_flight = launched
            self._flush()

    def _needs_every_token(self) -> bool:
        """A running request's sampler needs its tokens so far on the host (penalties, bad words of
        several tokens, a grammar's next mask), or its proposer does (a speculating sequence; its
        verify step's tokens are known only on the host): the next step waits for the one in flight."""
        return any(seq.num_in_flight and (seq.params.reads_token_history or seq.grammar is not None
                                          or self._speculating(seq))
                   for seq in self._host_token_readers)

    @staticmethod
    def _speculating(seq: Sequence) -> bool:
        return seq.speculation is not None and seq.speculation.active(seq.num_output_tokens)

    def _propose(self) -> float:
        """Drafts for each speculating sequence about to decode with all its tokens on the host, all at
        once; as many as it plans (backend/speculative.py: 0 pauses it), at most as many as leave room
        for the token after them within max_tokens. A proposer that fails (a draft model's forward)
        fails the requests it was proposing for. Returns the seconds the proposer took."""
        if self._proposer is None:
            return 0.0
        asking, requests = [], []
        num_running = len(self.scheduler.running)
        for seq in self.scheduler.running:
            if seq.num_in_flight or seq.num_pending != 1 or not self._speculating(seq):
                continue
            room = seq.params.max_tokens - seq.num_output_tokens - 1
            if room < 1:
                continue
            wanted = self._draft_control.plan(seq.speculation, num_running, seq.num_output_tokens)
            if wanted:
                asking.append(seq)
                requests.append(DraftRequest(seq.speculation.state, seq.token_ids, min(wanted, room)))
        if not requests:
            return 0.0
        start = time.perf_counter()
        try:
            proposals = self._proposer.propose(requests)
        except Exception as exc:
            log.error("proposing drafts failed", exc_info=exc)
            for seq in asking:
                self._finish(seq, "error", error=f"speculative decoding's proposer failed: {type(exc).__name__}: {exc}")
            return 0.0
        seconds = time.perf_counter() - start
        self._draft_control.costs.observe_proposal(sum(map(len, proposals)), seconds)
        for seq, drafts in zip(asking, proposals):
            if drafts:
                seq.draft_token_ids = drafts
            else:
                seq.speculation.record_miss(seq.num_output_tokens)
        return seconds

    def _grammar_news(self) -> bool:
        """A waiting grammar finished compiling, or ran out of time."""
        now = time.monotonic()
        return any(p.future.done() or p.timed_out(now) for p in self._compiling.values())

    def _next_grammar_deadline(self) -> Optional[float]:
        """Seconds until the first waiting grammar times out (None: none is compiling, or the tokenizer
        they wait for is still being built: its end wakes the loop)."""
        deadline = min((p.deadline for p in self._compiling.values()), default=math.inf)
        return None if deadline == math.inf else max(0.0, deadline - time.monotonic())

    def _admit_compiled(self) -> None:
        """Sequences whose grammar compiled join the scheduler, each with its own matcher; those whose
        constraint failed, or did not compile in time, end "invalid" (nothing else waits for them)."""
        now = time.monotonic()
        for seq, grammar in list(self._compiling.items()):
            if seq.finish_reason is not None:  # cancelled while compiling
                del self._compiling[seq]
            elif grammar.future.done():
                del self._compiling[seq]
                if grammar.future.exception() is not None:
                    self._finish(seq, "invalid", error=str(grammar.future.exception()))
                else:
                    seq.grammar = Grammar(grammar.future.result(), seq.eos_token_ids | set(seq.params.stop_token_ids))
                    self.scheduler.add(seq)
            elif grammar.timed_out(now):
                del self._compiling[seq]
                self._finish(seq, "invalid", error=(
                    f"'structured_outputs.{seq.params.structured_outputs.kind}' did not compile within "
                    f"{self.config.grammar_compile_timeout_s:g} s (grammar_compile_timeout_s)"))

    def _launch(self, previous: Optional[StepInFlight]) -> Optional[StepInFlight]:
        """Schedule and launch the next step (None if nothing could be scheduled, or it failed)."""
        start = time.perf_counter()
        proposing_s = self._propose()
        proposed = time.perf_counter()
        self._step_times.propose_s += proposed - start
        output = self.scheduler.schedule()
        self._num_preemptions += len(output.preempted)
        for seq in output.preempted:  # recomputed on resume; its drafts start again from its tokens then
            self._release_proposal_state(seq)
        if not output.chunks:
            return None
        if self._draft_control is not None:
            self._timed_step = (output, start, proposing_s)
        self._step_times.schedule_s += time.perf_counter() - proposed
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
        self._stepped = True
        updating = time.perf_counter()
        output = step.output
        samplers = output.samplers
        for row in sampled.failed_rows:  # only these requests fail; the rest of the batch goes on
            self._finish(samplers[row].seq, "error", error="the model's scores for this request were not finite "
                                                           "(NaN or infinity): nothing could be sampled")
        new_tokens = sampled.every_sequence_tokens()
        if sampled.num_accepted is not None:
            self._count_drafts(samplers, sampled.num_accepted)
        with_logprobs = sampled.any_logprobs
        for seq, i, n in self.scheduler.update(output, new_tokens):
            broken = grammar_done = None
            if seq.grammar is not None and seq.finish_reason is None:  # (never has drafts)
                ended = seq.grammar.accept(new_tokens[i][0])
                if ended == "stop":  # the grammar is complete and nothing may follow
                    self.scheduler.finish(seq, "stop")
                    grammar_done = True
                else:
                    broken = ended
            logprobs = sampled.token_logprobs(i) if with_logprobs else None
            self._deliver(seq, TokenDelta(new_tokens[i][:n], seq.finish_reason, None, seq.num_cached_prompt_tokens,
                                          None if logprobs is None else logprobs[:n], not grammar_done))
            if broken is not None:
                self._finish(seq, "error", error=f"the generated token broke the structured-outputs constraint: "
                                                 f"{broken}")
        done = time.perf_counter()
        self._step_times.update_s += done - updating
        if self._timed_step is not None and self._timed_step[0] is output:
            self._time_step(output, done - self._timed_step[1] - self._timed_step[2])

    def _time_step(self, output: SchedulerOutput, seconds: float) -> None:
        """What a decode step cost (launched after the one before it had completed: none of its time
        is another's), less its proposer's time, for the choice of drafts; steps with prefill chunks
        are left out."""
        chunks = [scheduled.chunk for scheduled in output.chunks]
        if all(c.needs_logits and len(c.token_ids) == 1 + c.num_drafts for c in chunks):
            self._draft_control.costs.observe_step(len(chunks), sum(c.num_drafts for c in chunks), seconds)

    def _count_drafts(self, samplers: list, num_accepted: list[int]) -> None:
        """Speculative decoding's counts, and each verifying sequence's own (which may pause it)."""
        positions = self._speculative.num_speculative_tokens
        for scheduled, accepted in zip(samplers, num_accepted):
            num_drafts = scheduled.chunk.num_drafts
            if num_drafts:
                self._spec_decode = self._spec_decode.plus(num_drafts, accepted, positions)
                self._draft_control.record_verify(scheduled.seq.speculation, num_drafts, accepted)

    def _fail_step(self, output: SchedulerOutput, exc: Exception) -> None:
        log.error("engine step failed", exc_info=exc)
        for scheduled in output.chunks:
            self._finish(scheduled.seq, "error", error=f"{type(exc).__name__}: {exc}")

    def _refuse(self, seq: Sequence) -> None:
        """End a request the engine never queued: "overloaded", which its front answers UNAVAILABLE."""
        self._release_proposal_state(seq)
        self._outbox.append((seq.request_id, TokenDelta([], "overloaded", self.config.queue_full_message())))

    def _finish(self, seq: Sequence, reason: str, error: Optional[str] = None) -> None:
        if seq.finish_reason is not None:  # already ended (e.g. cancelled while its step ran)
            return
        self.scheduler.finish(seq, reason)
        self._deliver(seq, TokenDelta([], reason, error, seq.num_cached_prompt_tokens))

    def _deliver(self, seq: Sequence, delta: TokenDelta) -> None:
        if delta.finish_reason is not None:  # every way a sequence ends comes here once
            del self._sequences[seq.request_id]
            self._host_token_readers.discard(seq)
            self._release_proposal_state(seq)
            if seq.first_token_at is not None:
                delta = delta._replace(phases=RequestPhases(seq.admitted_at - seq.queued_at,
                                                            seq.first_token_at - seq.admitted_at,
                                                            time.monotonic() - seq.first_token_at))
        self._outbox.append((seq.request_id, delta))

    def _release_proposal_state(self, seq: Sequence) -> None:
        """What the proposer holds for `seq` (a draft model's KV blocks) goes back."""
        if seq.speculation is not None:
            self._proposer.release(seq.speculation.state)

    def _flush(self) -> None:
        """Publish this loop's deltas, all at once. A step that made none (prefill chunks only)
        publishes an empty list: to an engine process's parent that is the sign of a step that
        returned (its watchdog, backend/engine_process.py)."""
        if self._outbox or self._stepped:
            deltas, self._outbox, self._stepped = self._outbox, [], False
            start = time.perf_counter()
            self._publish(deltas)
            self._step_times.publish_s += time.perf_counter() - start
