"""`AsyncGemmaClient`: the same surface as `GemmaClient` for asyncio.

One gRPC channel per client; every request is its own call on it, so many concurrent streams from
one event loop are independent. A stream that is left early - `break`, `aclose()`, an exception,
or cancelling the task that reads it - cancels its call, and Triton cancels the request.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Mapping, Optional

import grpc
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from . import _wire
from .client import _ClientOptions, _remaining
from .errors import (ConnectionFailedError, GemmaClientError, UnavailableError, from_grpc,
                     from_triton)
from .outputs import Completion, CompletionBuilder, Delta


class AsyncGemmaClient(_ClientOptions):
    """Asyncio client; see `GemmaClient` for the arguments.

    >>> async with AsyncGemmaClient("localhost:8001") as client:
    ...     print((await client.generate("Hi", max_tokens=8)).text)
    ...     async for delta in client.stream("Tell me a story"):
    ...         print(delta.text, end="")
    """

    _triton: Optional[triton_aio.InferenceServerClient] = None

    async def generate(self, prompt: str, *, timeout: Optional[float] = None,
                       headers: Optional[Mapping[str, str]] = None, request_id: str = "",
                       **sampling: Any) -> Completion:
        """Generate a whole completion (prompt excluded) in one response."""
        request, timeout, headers = self._prepare(prompt, sampling, False, timeout, headers)
        builder = CompletionBuilder()
        async with AsyncDeltaStream(self, request, timeout, headers, request_id) as deltas:
            async for delta in deltas:
                builder.add(delta)
        return builder.build()

    def stream(self, prompt: str, *, timeout: Optional[float] = None,
               headers: Optional[Mapping[str, str]] = None, request_id: str = "",
               **sampling: Any) -> "AsyncDeltaStream":
        """Return an async iterator of `Delta`s (also an async context manager). Arguments are
        checked now; the request is sent on the first `__anext__`."""
        request, timeout, headers = self._prepare(prompt, sampling, True, timeout, headers)
        return AsyncDeltaStream(self, request, timeout, headers, request_id)

    async def is_ready(self, timeout: Optional[float] = None) -> bool:
        """True when the server is reachable and ready and the model is loaded and ready."""
        try:
            await self.check_ready(timeout)
        except GemmaClientError:
            return False
        return True

    async def check_ready(self, timeout: Optional[float] = None) -> None:
        """Like `is_ready`, but raise why not (see `GemmaClient.check_ready`)."""
        client = self._client()
        headers = _wire.merge_headers(self.headers, grpc_error_status=False)
        timeout = self.timeout if timeout is None else timeout
        try:
            if not await client.is_server_ready(headers=headers, client_timeout=timeout):
                raise UnavailableError(f"server at {self.url} is not ready")
            if await client.is_model_ready(self.model, self.model_version, headers=headers,
                                           client_timeout=timeout):
                return
            await client.get_model_metadata(self.model, self.model_version, headers=headers,
                                            client_timeout=timeout)
        except InferenceServerException as e:
            raise from_triton(e) from None
        raise UnavailableError(f"model {self.model!r} is loaded but not ready")

    async def close(self) -> None:
        if self._triton is not None:
            await self._triton.close()
            self._triton = None

    async def __aenter__(self) -> "AsyncGemmaClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _client(self) -> triton_aio.InferenceServerClient:
        # Created on first use, inside the running event loop the channel belongs to.
        if self._triton is None:
            self._triton = triton_aio.InferenceServerClient(**self._connection)
        return self._triton


class AsyncDeltaStream:
    """The deltas of one request. Closing it before the last delta cancels the request.

    Use `async for` directly (a `break` cancels as soon as the iterator is dropped), or
    `async with client.stream(...) as deltas:` for cancellation at a well-defined point.
    """

    def __init__(self, client: AsyncGemmaClient, request: _wire.Request, timeout: Optional[float],
                 headers: dict, request_id: str):
        self._client = client
        self._inputs = request.inputs
        self._headers = headers
        self._request_id = request_id
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._call = None         # tritonclient's response iterator for the current attempt
        self._decoder = request.decoder()
        self._attempt = 0
        self._yielded = False
        self._finished = False    # the server is done with the request
        self._closed = False

    def __aiter__(self) -> "AsyncDeltaStream":
        return self

    async def __anext__(self) -> Delta:
        while True:
            if self._closed or self._finished:
                await self.aclose()
                raise StopAsyncIteration
            if self._call is None:
                self._call = self._open()
            try:
                result, error = await self._call.__anext__()
            except StopAsyncIteration:
                self._finished = True
                tail = self._decoder.flush()
                if tail:
                    return Delta(tail)
                continue
            except grpc.RpcError as e:  # gRPC ended the stream: timeout, connection, status header
                await self._fail_or_retry(from_grpc(e), in_band=False)
                continue
            except BaseException:  # asyncio.CancelledError (task cancelled), KeyboardInterrupt
                self._cancel()
                raise
            if error is not None:  # the model's error response, its last one
                await self._fail_or_retry(from_triton(error), in_band=True)
                continue
            delta, final = self._decoder.decode(result)
            if final:
                self._finished = True
            if delta is None:
                continue
            self._finished = self._finished or delta.finish_reason is not None
            self._yielded = True
            return delta

    async def _fail_or_retry(self, error: GemmaClientError, in_band: bool) -> None:
        if in_band:  # the request is over on the server: end the stream politely
            self._finished = True
            await self.aclose()
        else:
            self._cancel()
        if (isinstance(error, ConnectionFailedError) and not self._yielded
                and self._attempt < self._client.retries):
            await asyncio.sleep(self._client._retry_delay(self._attempt))
            self._attempt += 1
            self._call = None
            self._closed = self._finished = False
            return
        raise error

    def _open(self):
        request = {"model_name": self._client.model, "model_version": self._client.model_version,
                   "inputs": self._inputs, "request_id": self._request_id}

        async def one_request():
            yield request

        return self._client._client().stream_infer(
            one_request(), stream_timeout=_remaining(self._deadline), headers=self._headers)

    def _cancel(self) -> None:
        if self._call is not None and not self._closed:
            self._call.cancel()
        self._closed = True

    async def aclose(self) -> None:
        """Stop reading; cancels the request unless the server already finished it."""
        if self._closed:
            return
        if not self._finished:
            self._cancel()
            return
        self._closed = True
        # Finished: read the (already closing) stream to its end instead of cancelling it.
        if self._call is not None:
            try:
                async for _ in self._call:
                    pass
            except (grpc.RpcError, InferenceServerException):
                pass

    async def __aenter__(self) -> "AsyncDeltaStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # A `break` out of `async for` drops the iterator without aclose(): cancel right away.
        if not self._closed and not self._finished and self._call is not None:
            try:
                self._call.cancel()
            except Exception:  # interpreter or event loop already shutting down
                pass
