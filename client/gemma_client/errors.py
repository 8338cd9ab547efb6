"""Typed errors: one class per way a request can fail, each carrying the server's message.

Triton reports failures as `tritonclient.utils.InferenceServerException` (with a status string such
as "StatusCode.INVALID_ARGUMENT", or none for an error inside a stream) or, on the asyncio client,
as a raw `grpc.RpcError`. `from_triton` and `from_grpc` turn either into one of the classes below,
so callers catch what happened rather than parsing messages.
"""
from __future__ import annotations

from typing import Optional

from gemma_protocol import split_error_status


class GemmaClientError(Exception):
    """Base class. `message` is the server's (or gRPC's) text; `status` the gRPC code name or None."""

    exit_code = 1  # the CLI's exit status for this error; see `gemma-client --help`

    def __init__(self, message: str, status: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message


class InvalidArgumentError(GemmaClientError, ValueError):
    """The request was rejected: bad sampling parameter, empty prompt, prompt too long, ..."""
    exit_code = 3


class ConnectionFailedError(GemmaClientError):
    """The server could not be reached: refused, unresolvable, TLS handshake, connection lost."""
    exit_code = 4


class UnavailableError(GemmaClientError):
    """The server is up but will not take the request now (overloaded, shutting down, not ready)."""
    exit_code = 5


class DeadlineExceededError(GemmaClientError, TimeoutError):
    """The per-request timeout expired; the request is cancelled on the server."""
    exit_code = 6


class CancelledError(GemmaClientError):
    """The request was cancelled (by the server, or by this client before it finished)."""
    exit_code = 7


class ModelNotFoundError(GemmaClientError):
    """The server does not serve a model by that name."""
    exit_code = 8


class AuthenticationError(GemmaClientError):
    """The server (or a proxy in front of it) refused the credentials in the request headers."""
    exit_code = 9


class ServerError(GemmaClientError):
    """Any other failure reported by the server (INTERNAL, UNKNOWN, ...)."""
    exit_code = 10


_BY_STATUS = {
    "INVALID_ARGUMENT": InvalidArgumentError,
    "OUT_OF_RANGE": InvalidArgumentError,
    "UNAVAILABLE": UnavailableError,
    "RESOURCE_EXHAUSTED": UnavailableError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
    "CANCELLED": CancelledError,
    "NOT_FOUND": ModelNotFoundError,
    "UNAUTHENTICATED": AuthenticationError,
    "PERMISSION_DENIED": AuthenticationError,
}

# gRPC reports transport failures as UNAVAILABLE too; these phrases (from grpc core) tell them apart
# from a server that answered "unavailable".
_TRANSPORT_PHRASES = (
    "failed to connect", "connection refused", "connect failed", "errors resolving",
    "dns resolution failed", "name resolution", "domain name not found", "socket closed",
    "connection reset", "broken pipe", "no route to host", "network is unreachable",
    "handshake failed", "ssl_error", "keepalive watchdog timeout", "endpoint closing",
)

# A stream error without a status tag (a server that does not follow `gemma_protocol.tag_error`, e.g. an
# older build of ours, or another backend): recognise what tritonclient, Triton and this project's
# engine write. Checked in order; anything else is a ServerError.
_UNTAGGED_PHRASES = (
    (CancelledError, ("locally cancelled", "request cancelled", "was cancelled", "model is shutting down")),
    (ModelNotFoundError, ("unknown model",)),
    (UnavailableError, ("overloaded", "already waiting", "retry later", "engine is shutting down")),
    (ServerError, ("generation failed",)),
    (InvalidArgumentError, ("must be", "must hold", "exceeds", "is empty", "is required", "is not valid",
                            "unknown sampling parameter", "the limit is", "unexpected inference input")),
)


def from_status(status: Optional[str], message: str) -> GemmaClientError:
    """Map a gRPC status ("StatusCode.X", "X" or None) and message to the matching error class.

    Without a status, the status tag of `gemma_protocol.split_error_status` is used (and removed from the
    message), then known phrases.
    """
    tagged, message = split_error_status(message)
    code = (status or tagged or "").rsplit(".", 1)[-1].upper()
    lowered = message.lower()
    if code == "UNAVAILABLE" and any(p in lowered for p in _TRANSPORT_PHRASES):
        return ConnectionFailedError(message, status)
    if not code:
        for cls, phrases in _UNTAGGED_PHRASES:
            if any(p in lowered for p in phrases):
                return cls(message, status)
    return _BY_STATUS.get(code, ServerError)(message, status or (f"StatusCode.{code}" if code else None))


def from_triton(error) -> GemmaClientError:
    """Map a `tritonclient.utils.InferenceServerException`."""
    return from_status(error.status(), error.message() or str(error))


def from_grpc(error) -> GemmaClientError:
    """Map a `grpc.RpcError` (as the asyncio client raises them)."""
    code = error.code()
    return from_status(str(code) if code is not None else None, error.details() or str(error))
