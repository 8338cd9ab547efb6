"""The choices of one request, each its own Triton request, read concurrently on the event loop.

`Choices` is an async iterator of (choice index, Delta) in arrival order. The first failure ends
it: the other choices are cancelled and the error (a GemmaClientError) is raised. `aclose()`
cancels whatever is still running - the Triton requests are cancelled and the engine frees their
KV blocks - so whoever reads it must close it, finished or not (`async with` does).
"""
from __future__ import annotations

import asyncio
from typing import Optional, Sequence, Union

from gemma_client import AsyncGemmaClient, Delta, GemmaClientError

from .sampling import ChoiceRequest

_Event = tuple[int, Union[Delta, GemmaClientError, None]]  # None: that choice is done


class Choices:
    """stream=True: a Delta per Triton response. stream=False: one Delta per choice with the whole
    text (Triton sends it in one response), for non-streaming HTTP answers."""

    def __init__(self, client: AsyncGemmaClient, requests: Sequence[ChoiceRequest], stream: bool):
        self._client = client
        self._stream = stream
        self._events: asyncio.Queue[_Event] = asyncio.Queue()
        self._running = len(requests)
        self._first: Optional[tuple[int, Delta]] = None  # read by `wait_first`, not handed out yet
        self._tasks = [asyncio.create_task(self._run(r)) for r in requests]

    async def _run(self, request: ChoiceRequest) -> None:
        try:
            if self._stream:
                async with self._client.stream(request.prompt, **request.sampling) as deltas:
                    async for delta in deltas:
                        self._events.put_nowait((request.index, delta))
            else:
                whole = await self._client.generate(request.prompt, **request.sampling)
                self._events.put_nowait((request.index, Delta(
                    whole.text, token_ids=whole.token_ids, finish_reason=whole.finish_reason,
                    num_input_tokens=whole.num_input_tokens, num_output_tokens=whole.num_output_tokens,
                    logprobs=whole.logprobs, num_cached_tokens=whole.num_cached_tokens)))
        except GemmaClientError as e:
            self._events.put_nowait((request.index, e))
        finally:
            self._events.put_nowait((request.index, None))

    def __aiter__(self) -> "Choices":
        return self

    async def wait_first(self) -> None:
        """Wait until some choice has produced a delta, raising if a choice failed before. Lets the
        caller answer a refused request (bad argument, overload) with an HTTP error status before
        it commits to a 200 event stream."""
        if self._first is None:
            try:
                self._first = await self.__anext__()
            except StopAsyncIteration:
                pass

    async def __anext__(self) -> tuple[int, Delta]:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        while self._running:
            index, event = await self._events.get()
            if event is None:
                self._running -= 1
            elif isinstance(event, GemmaClientError):
                await self.aclose()
                raise event
            else:
                return index, event
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._running = 0
        for task in self._tasks:
            task.cancel()  # a cancelled stream cancels its Triton request (AsyncDeltaStream)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> "Choices":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def collect(choices: Choices, count: int) -> list[Optional[Delta]]:
    """Non-streaming: each choice's one Delta, by index."""
    results: list[Optional[Delta]] = [None] * count
    async with choices:
        async for index, delta in choices:
            results[index] = delta
    return results
