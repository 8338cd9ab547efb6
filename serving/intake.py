"""Prompts tokenized off Triton's `execute`, those waiting batched one engine step's worth at a time.

Triton hands a model instance its requests one `execute` call at a time, so whatever `execute` does
per request bounds how fast requests are taken in, and a burst waits in Triton's queue. Tokenizing a
1,024-token prompt takes 1.6 ms on the CPU VM; on the H100 machine `execute` took 4-5 ms a request
with 1,024-token prompts against 0.5-1.3 ms with short ones, and requests waited 20-146 ms in
Triton's queue at 32-256 clients (docs/benchmarks.md, server_intake). So `execute` only parses a
request and queues it here; one thread takes every request queued so far, tokenizes their prompts in
batches (the Rust tokenizer encodes a batch on all cores with the GIL released) and submits them in
arrival order.

A batch holds about one engine step's prompt tokens (`chunk_tokens`, the engine's
max_num_batched_tokens), not everything queued: the engine prefills no more than that a step, and
tokenizing a whole burst before submitting any of it delayed the first tokens of all of it. On the H100
with 1,024-token prompts, one batch of everything queued cut Triton's queue from 68 to 14 ms a
request at 128 clients but raised the TTFT p50 by 10 ms at 8 clients and 54 ms at 64.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, Optional, TypeVar

Item = TypeVar("Item")

_STOP = object()
CHARS_PER_TOKEN = 4  # English under Gemma's tokenizer: 3.4-4.1 characters a token (this repository's docs)


class PromptIntake(Generic[Item]):
    """`put(item, prompt)` queues a request; the intake thread calls `submit(item, prompt_ids)` for each,
    in the order they were put, and `fail(item, exc)` for one whose submit raised or whose batch did
    not tokenize: nothing escapes the thread, or every later request would wait forever. A batch's
    prompts add up to at most `chunk_tokens` tokens' worth of characters, or it is one prompt."""

    def __init__(self, encode_batch: Callable[[list[str]], list[list[int]]],
                 submit: Callable[[Item, list[int]], None], fail: Callable[[Item, Exception], None],
                 chunk_tokens: int, name: str = "gemma-intake"):
        self._encode_batch, self._submit, self._fail = encode_batch, submit, fail
        self._chunk_chars = chunk_tokens * CHARS_PER_TOKEN
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def put(self, item: Item, prompt: str) -> None:
        self._queue.put((item, prompt))

    def stop(self) -> None:
        """Submit everything queued so far, then end the thread."""
        self._queue.put(_STOP)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            taken, stopping = self._take()
            for batch in self._batches(taken):
                self._handle(batch)
            if stopping:
                return

    def _take(self) -> tuple[list[tuple[Item, str]], bool]:
        """The next request (waiting for one) and every other one queued by now; True once stop() was asked."""
        batch: list = []
        entry: Optional[object] = self._queue.get()
        while entry is not _STOP:
            batch.append(entry)
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                return batch, False
        return batch, True

    def _batches(self, taken: list[tuple[Item, str]]) -> list[list[tuple[Item, str]]]:
        """`taken` cut, in order, into runs whose prompts add up to at most the chunk's characters."""
        batches: list[list[tuple[Item, str]]] = []
        chars = 0
        for entry in taken:
            if not batches or chars + len(entry[1]) > self._chunk_chars:
                batches.append([])
                chars = 0
            batches[-1].append(entry)
            chars += len(entry[1])
        return batches

    def _handle(self, batch: list[tuple[Item, str]]) -> None:
        try:
            encoded = self._encode_batch([prompt for _, prompt in batch])
        except Exception as exc:  # noqa: BLE001 - each request gets its error; the thread goes on
            for item, _ in batch:
                self._fail(item, exc)
            return
        for (item, _), prompt_ids in zip(batch, encoded):
            try:
                self._submit(item, prompt_ids)
            except Exception as exc:  # noqa: BLE001 - as above
                self._fail(item, exc)
