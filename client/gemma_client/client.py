"""`GemmaClient`: blocking generate/stream over Triton's gRPC streaming API.

Every request runs on its own gRPC bidirectional stream (the model is decoupled, so the unary
ModelInfer RPC is not available). A stream that is abandoned before its last response - `break`,
an exception in the caller's loop, `close()` - is cancelled, and Triton cancels the request in the
model, which frees its KV cache.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import Any, Iterator, Mapping, Optional

import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from . import _wire
from .errors import (ConnectionFailedError, GemmaClientError, ModelNotFoundError, UnavailableError,
                     from_triton)
from .outputs import Completion, CompletionBuilder, Delta

DEFAULT_URL = "localhost:8001"
DEFAULT_MODEL = "gemma"


class _ClientOptions:
    """Connection and policy options shared by `GemmaClient` and `AsyncGemmaClient`."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        model: str = DEFAULT_MODEL,
        *,
        model_version: str = "",
        timeout: Optional[float] = None,
        retries: int = 0,
        retry_backoff: float = 0.5,
        headers: Optional[Mapping[str, str]] = None,
        ssl: bool = False,
        root_certificates: Optional[str] = None,
        private_key: Optional[str] = None,
        certificate_chain: Optional[str] = None,
        strict_sampling: bool = True,
        cached_tokens: bool = False,
        grpc_error_status: bool = False,
        verbose: bool = False,
    ):
        """
        url: "host:port" of Triton's gRPC endpoint. model / model_version: which model to call.
        timeout: default per-request timeout in seconds (None: no limit); a request that runs past
            it raises `DeadlineExceededError` and is cancelled on the server.
        retries: how many times to retry a request whose connection failed before any token
            arrived (never after, so a retry can't duplicate output); retry_backoff: first wait,
            doubled on each retry.
        headers: sent with every request (e.g. {"authorization": "Bearer ..."}).
        ssl, root_certificates, private_key, certificate_chain: TLS; the last three are PEM file
            paths (None: gRPC's default roots, no client certificate).
        strict_sampling: reject sampling keys not in `gemma_protocol.SAMPLING_FIELDS`; False passes
            them through for backends that know more keys (known keys are type-checked anyway).
        cached_tokens: also ask for `num_cached_tokens` (prompt tokens served from the prefix cache,
            on `Delta` and `Completion`). Off by default: every response then carries one more tensor,
            which costs the server ~10% more CPU per streamed response.
        grpc_error_status: send the `triton_grpc_error` header, which makes Triton end a failed
            stream with its real gRPC status. Off by default: the Triton 2.51 bundled with
            nvidia-pytriton segfaults when several such streams fail at once. Without it, errors are
            typed from the status tag the model puts in the message (`gemma_protocol.split_error_status`).
        """
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.url = url
        self.model = model
        self.model_version = model_version
        self.timeout = timeout
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.headers = dict(headers or {})
        self.strict_sampling = strict_sampling
        self.cached_tokens = cached_tokens
        self.grpc_error_status = grpc_error_status
        self._connection = dict(url=url, verbose=verbose, ssl=ssl, root_certificates=root_certificates,
                                private_key=private_key, certificate_chain=certificate_chain,
                                channel_args=_channel_args())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, model={self.model!r})"

    def _prepare(self, prompt: str, sampling: Mapping[str, Any], stream: bool,
                 timeout: Optional[float], headers: Optional[Mapping[str, str]]):
        """Validate everything before anything is sent; return (request, timeout, headers)."""
        params = _wire.check_sampling(sampling, strict=self.strict_sampling)
        request = _wire.build_request(prompt, params, stream, cached_tokens=self.cached_tokens)
        return (request, self.timeout if timeout is None else timeout,
                _wire.merge_headers(self.headers, headers, grpc_error_status=self.grpc_error_status))

    def _retry_delay(self, attempt: int) -> float:
        return self.retry_backoff * (2 ** attempt)


def _channel_args() -> list[tuple[str, Any]]:
    """tritonclient's defaults, plus a short first reconnect backoff: after a failed connection
    gRPC fails every call at once until its backoff expires (1 s by default), which would make a
    retry after `retry_backoff` fail without trying."""
    keepalive = triton_grpc.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", triton_grpc.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", triton_grpc.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


def _remaining(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else max(deadline - time.monotonic(), 0.001)


class GemmaClient(_ClientOptions):
    """Blocking client. Thread-safe: each request uses its own gRPC stream.

    >>> client = GemmaClient("localhost:8001")
    >>> client.generate("Why is the sky blue?", max_tokens=32).text
    >>> for delta in client.stream("Tell me a story", temperature=0.7):
    ...     print(delta.text, end="", flush=True)

    Sampling keyword arguments are those of `gemma_protocol.SAMPLING_FIELDS` (max_tokens, temperature,
    top_p, top_k, seed, stop, ...); per request, `timeout`, `headers` and `request_id` may be given.
    """

    _admin_client: Optional[triton_grpc.InferenceServerClient] = None  # for readiness checks
    _admin_lock = threading.Lock()

    def generate(self, prompt: str, *, timeout: Optional[float] = None,
                 headers: Optional[Mapping[str, str]] = None, request_id: str = "",
                 **sampling: Any) -> Completion:
        """Generate a whole completion (prompt excluded) in one response."""
        request, timeout, headers = self._prepare(prompt, sampling, False, timeout, headers)
        builder = CompletionBuilder()
        for delta in self._run(request, timeout, headers, request_id):
            builder.add(delta)
        return builder.build()

    def stream(self, prompt: str, *, timeout: Optional[float] = None,
               headers: Optional[Mapping[str, str]] = None, request_id: str = "",
               **sampling: Any) -> Iterator[Delta]:
        """Yield `Delta`s as tokens arrive. Arguments are checked now; the request is sent on the
        first `next()`. Leaving the loop early cancels the request on the server."""
        request, timeout, headers = self._prepare(prompt, sampling, True, timeout, headers)
        return self._run(request, timeout, headers, request_id)

    def is_ready(self, timeout: Optional[float] = None) -> bool:
        """True when the server is reachable and ready and the model is loaded and ready."""
        try:
            self.check_ready(timeout)
        except GemmaClientError:
            return False
        return True

    def check_ready(self, timeout: Optional[float] = None) -> None:
        """Like `is_ready`, but raise why not: `ConnectionFailedError`, `ModelNotFoundError`,
        `UnavailableError` (server or model not ready), ..."""
        client = self._admin()
        headers = _wire.merge_headers(self.headers, grpc_error_status=False)
        timeout = self.timeout if timeout is None else timeout
        try:
            if not client.is_server_ready(headers=headers, client_timeout=timeout):
                raise UnavailableError(f"server at {self.url} is not ready")
            if client.is_model_ready(self.model, self.model_version, headers=headers, client_timeout=timeout):
                return
            client.get_model_metadata(self.model, self.model_version, headers=headers, client_timeout=timeout)
        except InferenceServerException as e:
            raise from_triton(e) from None
        raise UnavailableError(f"model {self.model!r} is loaded but not ready")

    def close(self) -> None:
        if self._admin_client is not None:
            self._admin_client.close()
            self._admin_client = None

    def __enter__(self) -> "GemmaClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _admin(self) -> triton_grpc.InferenceServerClient:
        with self._admin_lock:
            if self._admin_client is None:
                self._admin_client = triton_grpc.InferenceServerClient(**self._connection)
            return self._admin_client

    def _run(self, request: _wire.Request, timeout: Optional[float], headers: dict,
             request_id: str) -> Iterator[Delta]:
        """One request, retried on connection failure while nothing has been yielded yet."""
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            yielded = False
            try:
                with contextlib.closing(self._attempt(request, _remaining(deadline), headers, request_id)) as deltas:
                    for delta in deltas:
                        yielded = True
                        yield delta
                return
            except ConnectionFailedError:
                if yielded or attempt >= self.retries:
                    raise
                time.sleep(self._retry_delay(attempt))
                attempt += 1

    def _attempt(self, request: _wire.Request, timeout: Optional[float], headers: dict,
                 request_id: str) -> Iterator[Delta]:
        responses: queue.SimpleQueue = queue.SimpleQueue()
        triton = triton_grpc.InferenceServerClient(**self._connection)
        finished = False  # the server is done with the request: close politely instead of cancelling
        try:
            triton.start_stream(callback=lambda result, error: responses.put((result, error)),
                                stream_timeout=timeout, headers=headers)
            try:
                triton.async_stream_infer(self.model, request.inputs, model_version=self.model_version,
                                          request_id=request_id, enable_empty_final_response=True)
            except InferenceServerException as e:
                # The stream died already (e.g. connection refused); its callback has the reason.
                try:
                    responses.put(responses.get(timeout=5.0))
                except queue.Empty:
                    raise from_triton(e) from None
            decoder = request.decoder()
            while True:
                result, error = responses.get()
                if error is not None:
                    # A status means gRPC ended the stream; without one the model answered with an
                    # error, its last response: close politely, there is nothing left to cancel.
                    finished = error.status() is None
                    raise from_triton(error)
                delta, final = decoder.decode(result)
                if delta is not None:
                    finished = finished or delta.finish_reason is not None
                    yield delta
                if final:
                    finished = True
                    return
        finally:
            triton.stop_stream(cancel_requests=not finished)
            triton.close()
