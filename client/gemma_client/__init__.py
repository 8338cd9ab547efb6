"""Client library and CLI for Gemma models served by Triton Inference Server (gRPC, streaming).

    from gemma_client import GemmaClient
    client = GemmaClient("localhost:8001")
    for delta in client.stream("Why is the sky blue?", max_tokens=64):
        print(delta.text, end="", flush=True)

The tensor I/O contract is the `gemma_protocol` package beside this one (the server imports it too).
Names are imported on first use: `import gemma_client` loads neither tritonclient nor grpc.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    ".client": ("GemmaClient", "DEFAULT_URL", "DEFAULT_MODEL"),
    ".aio": ("AsyncGemmaClient", "AsyncDeltaStream"),
    ".chat": ("Conversation", "Turn"),
    ".outputs": ("Completion", "Delta", "Logprob", "TokenLogprobs"),
    ".errors": ("GemmaClientError", "InvalidArgumentError", "ConnectionFailedError", "UnavailableError",
                "DeadlineExceededError", "CancelledError", "ModelNotFoundError", "AuthenticationError",
                "ServerError"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .aio import AsyncDeltaStream, AsyncGemmaClient
    from .chat import Conversation, Turn
    from .client import DEFAULT_MODEL, DEFAULT_URL, GemmaClient
    from .errors import (AuthenticationError, CancelledError, ConnectionFailedError, DeadlineExceededError,
                         GemmaClientError, InvalidArgumentError, ModelNotFoundError, ServerError,
                         UnavailableError)
    from .outputs import Completion, Delta, Logprob, TokenLogprobs
