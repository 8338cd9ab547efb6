"""The request side of an engine, in the caller's process: tokenize and check a request, refuse it
beyond the queue bound, give it a handle, and hand each token delta the engine reports to its handle.

The engine behind it runs on a thread of this process (`backend.engine.Engine`) or in a process
of its own (`backend.engine_process.EngineProcess`); both are an `EngineFront`, so requests are
checked, numbered and streamed by the same code either way. Text is made by each handle's reader
(backend/outputs.py), never by the engine.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence as Seq, Union

from .errors import EngineOverloadedError, InvalidRequestError
from .kv_cache import blocks_for
from .outputs import OutputProcessor, RequestOutput, TokenDelta
from .sampling import SamplingParams
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLimits:
    """What a request is checked against; known once the engine has its model and cache."""
    vocab_size: int
    max_model_len: int  # prompt + generated tokens
    num_blocks: int  # KV cache blocks
    block_size: int


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


class EngineFront:
    """Subclasses set `limits` once the engine is up, and pass each accepted request to the engine
    (`_enqueue`) and each cancellation or stop string found (`end`)."""
    limits: EngineLimits

    def __init__(self, tokenizer: Tokenizer, config):
        self.tokenizer, self.config = tokenizer, config
        self._lock = threading.Condition()
        self._handles: dict[int, RequestHandle] = {}  # request id -> handle, until its final delta
        self._next_id = 0
        self._closed = False  # shut down (or the engine is gone): requests are refused
        self.exit_error: Optional[str] = None  # why the engine stopped on its own, if it did

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
            # Requests not admitted yet count as waiting only beyond the free running slots (the
            # unfinished ones are running + waiting): a burst that fits the batch is never refused.
            if len(self._handles) - self.config.max_num_seqs >= self.config.max_queue_size:
                raise EngineOverloadedError(
                    f"{self.config.max_queue_size} requests are already waiting; retry later")
            request_id = self._next_id
            self._next_id += 1
            handle = RequestHandle(request_id, len(prompt_ids), processor, functools.partial(self.end, request_id),
                                   on_ready)
            self._handles[request_id] = handle
            self._enqueue(request_id, prompt_ids, params)  # under the lock: ids reach the engine in order
        return handle

    def end(self, request_id: int, reason: str) -> None:
        """Ask the engine to end a request ("cancelled", or "stop" for a stop string found)."""
        raise NotImplementedError

    def _enqueue(self, request_id: int, prompt_ids: list[int], params: SamplingParams) -> None:
        raise NotImplementedError

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
