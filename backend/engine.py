"""The engine's request side, in the caller's process: tokenize and check a request, refuse it beyond
the queue bound, give it a handle, and hand each token delta the engine core reports to its handle.

The core behind it (backend/engine_core.py: scheduler, runner, the engine thread) runs on a thread
of this process, or in a process of its own (backend/engine_process.py, the server's default); the
front owns either by composition and reads, checks and streams requests by the same code. Text is
made by each handle's reader (backend/outputs.py), never by the core.

    engine = backend.loader.start_engine(EngineConfig())   # resolves and checks the checkpoint first
    for output in engine.submit("Why is the sky blue?", SamplingParams(max_tokens=32)):
        print(output.text, end="")
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from typing import Callable, Iterator, Optional, Sequence as Seq, Union

from .engine_core import EngineCore, EngineStats
from .engine_process import EngineCoreProcess
from .errors import EngineOverloadedError, InvalidRequestError
from .outputs import OutputProcessor, RequestOutput, TokenDelta
from .params import EngineConfig, SamplingParams, blocks_for
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


class RequestHandle:
    """One submitted request. Token deltas arrive from the engine; whoever reads them (poll, or
    iterate) turns them into text in their own thread. Cancel any time."""

    def __init__(self, request_id: int, num_prompt_tokens: int, processor: OutputProcessor,
                 end: Callable[[str], None], on_ready: Optional[Callable[["RequestHandle"], None]]):
        self.request_id, self.num_prompt_tokens = request_id, num_prompt_tokens
        self._processor, self._end, self._on_ready = processor, end, on_ready
        self._deltas: list[TokenDelta] = []
        self._arrived = threading.Condition()

    def cancel(self) -> None:
        self._end("cancelled")

    def poll(self) -> Optional[RequestOutput]:
        """Everything generated since the last poll as one output (None if nothing new). Call
        from one thread at a time. A stop string found here stops the sequence in the engine."""
        with self._arrived:
            deltas, self._deltas = self._deltas, []
        out = self._processor.process(deltas)
        if out is not None and self._processor.stopped_by_text:
            self._end("stop")
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

    def _deliver(self, delta: TokenDelta) -> None:
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


class Engine:
    """Requests in, streamed outputs out. `config.checkpoint` is a resolved checkpoint directory and
    `tokenizer` its checked tokenizer (backend.loader.start_engine makes both); the core loads the
    model from the same directory and needs only the tokenizer's EOS ids."""

    def __init__(self, config: EngineConfig, tokenizer: Tokenizer, engine_process: bool = False,
                 shared_as: Optional[str] = None):
        """Starts the core (on a thread, or with `engine_process` in a process of its own, which with
        `shared_as` the engines of that name share: backend/engine_fronts.py) and returns once its
        model is loaded; a core that fails to start raises here."""
        self.tokenizer, self.config = tokenizer, config
        self._lock = threading.Lock()
        self._handles: dict[int, RequestHandle] = {}  # request id -> handle, until its final delta
        self._closed = False  # shut down (or the core is gone): requests are refused
        self.exit_error: Optional[str] = None  # why the core stopped on its own, if it did
        if engine_process:
            self.core = EngineCoreProcess(config, tokenizer.eos_token_ids, self._publish, self._core_exited,
                                          num_unfinished=lambda: len(self._handles), shared_as=shared_as)
        else:
            self.core = EngineCore(config, tokenizer.eos_token_ids, self._publish)
        self._next_id = self.core.request_id_base
        self.limits, self.device = self.core.limits, self.core.device

    def submit(self, prompt: Union[str, Seq[int]], params: SamplingParams,
               on_ready: Optional[Callable[[RequestHandle], None]] = None) -> RequestHandle:
        """Queue a request. With `on_ready`, on_ready(handle) is called whenever the request has new
        output, for the caller to `poll()` (from its own thread)."""
        if isinstance(prompt, str) and not prompt:
            raise InvalidRequestError("prompt is empty")
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if params.bad_words:
            params = dataclasses.replace(params, bad_words_token_ids=bad_words_token_ids(self.tokenizer,
                                                                                         params.bad_words))
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=self._room_for_output(prompt_ids))
        self._check_fits(prompt_ids, params)
        processor = OutputProcessor(self.tokenizer, prompt_ids, params)
        with self._lock:
            if self._closed:
                raise EngineOverloadedError(self.exit_error or "the engine is shutting down")
            # This front's own requests (the unfinished ones are running + waiting); where fronts share
            # an engine process, the engine also holds the bound for all of them (its "overloaded" end).
            if self.config.queue_is_full(len(self._handles)):
                raise EngineOverloadedError(self.config.queue_full_message())
            request_id = self._next_id
            self._next_id += 1
            handle = RequestHandle(request_id, len(prompt_ids), processor, functools.partial(self.end, request_id),
                                   on_ready)
            self._handles[request_id] = handle
            self.core.add(request_id, prompt_ids, params)  # under the lock: ids reach the core in order
        return handle

    def end(self, request_id: int, reason: str) -> None:
        """Ask the core to end a request ("cancelled", or "stop" for a stop string found)."""
        self.core.end(request_id, reason)

    def stats(self) -> EngineStats:
        """The core's counters; an engine process that stopped refuses (EngineOverloadedError)."""
        return self.core.stats()

    @property
    def started_here(self) -> bool:
        """Whether this front started its engine (False where it joined a shared engine process)."""
        return self.core.started_here

    @property
    def reports_engine_stats(self) -> bool:
        """False where another front of a shared engine process exports its stats (as of the last stats())."""
        return self.core.reports_engine_stats

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel everything in flight (each gets a final "cancelled" output) and stop the core."""
        with self._lock:
            self._closed = True
        self.core.shutdown(timeout)
        self._end_all("the engine stopped")  # what a core that did not stop in time left unfinished

    def _core_exited(self, error: str) -> None:
        """The engine process died: every unfinished request ends with `error`, new ones are refused."""
        self.exit_error = error
        self._end_all(error)

    def _end_all(self, error: str) -> None:
        with self._lock:
            self._closed = True
            unfinished = list(self._handles)
        self._publish([(request_id, TokenDelta([], "error", error)) for request_id in unfinished])

    def _publish(self, deltas: list[tuple[int, TokenDelta]]) -> None:
        """Hand each (request id, delta) to its handle; a final delta retires the handle."""
        for request_id, delta in deltas:
            if delta.finish_reason is not None:
                with self._lock:
                    handle = self._handles.pop(request_id, None)
            else:
                handle = self._handles.get(request_id)
            if handle is not None:
                handle._deliver(delta)

    def _room_for_output(self, prompt_ids: list[int]) -> int:
        """max_tokens for a request that leaves it to us (vLLM's None): what the context and a
        sequence's share of the KV cache (all of it) leave after the prompt."""
        limits = self.limits
        context = min(limits.max_model_len, limits.num_blocks * limits.block_size)
        if len(prompt_ids) >= context:
            raise InvalidRequestError(f"prompt ({len(prompt_ids)} tokens) + 1 output token exceeds the context of "
                                      f"{context} tokens")
        return context - len(prompt_ids)

    def _check_fits(self, prompt_ids: list[int], params: SamplingParams) -> None:
        limits = self.limits
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty")
        total = len(prompt_ids) + params.max_tokens
        if total > limits.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                f"the context of {limits.max_model_len} tokens")
        # A sequence alone must fit the cache: then preempting newer ones always lets the oldest finish.
        if blocks_for(total, limits.block_size) > limits.num_blocks:
            raise InvalidRequestError(f"prompt + max_tokens = {total} tokens exceeds the whole KV cache "
                                      f"({limits.num_blocks * limits.block_size} tokens)")
        if max(prompt_ids) >= limits.vocab_size or min(prompt_ids) < 0:
            raise InvalidRequestError(f"prompt token ids must be in [0, {limits.vocab_size})")
        if any(t >= limits.vocab_size for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be in [0, {limits.vocab_size})")
        # A tokenizer may know more tokens than the model scores (added tokens); those cannot be banned.
        if any(t >= limits.vocab_size for ids in params.bad_words_token_ids for t in ids):
            raise InvalidRequestError(f"'bad_words' tokenize to ids the model does not score "
                                      f"(not in [0, {limits.vocab_size}))")


def bad_words_token_ids(tokenizer: Tokenizer, words: Seq[str]) -> tuple[tuple[int, ...], ...]:
    """Each word's tokens as the word would start the text and as it would follow a space (vLLM's
    bad_words: a word and " word" are different tokens), without <bos>; each distinct sequence once."""
    sequences = (tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False)
                 for word in words for prefix in ("", " "))
    return tuple(dict.fromkeys(tuple(ids) for ids in sequences))
