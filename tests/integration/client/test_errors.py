"""Error mapping from what tritonclient and gRPC really raise; connection failures against a real
closed port. No server needed."""
from __future__ import annotations

import asyncio
import socket
import time

import pytest
from tritonclient.utils import InferenceServerException

import gemma_protocol as protocol
from gemma_client import (AsyncGemmaClient, AuthenticationError, CancelledError, ConnectionFailedError,
                          DeadlineExceededError, GemmaClient, GemmaClientError, InvalidArgumentError,
                          ModelNotFoundError, ServerError, UnavailableError)
from gemma_client.errors import from_triton


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("status, message, expected", [
    ("StatusCode.INVALID_ARGUMENT", "'max_tokens' must be >= 1", InvalidArgumentError),
    ("StatusCode.UNAVAILABLE", "engine overloaded: 8 requests waiting", UnavailableError),
    ("StatusCode.RESOURCE_EXHAUSTED", "queue full", UnavailableError),
    ("StatusCode.UNAVAILABLE", "failed to connect to all addresses; last error: UNKNOWN: "
     "ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused", ConnectionFailedError),
    ("StatusCode.UNAVAILABLE", "Socket closed", ConnectionFailedError),
    ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", DeadlineExceededError),
    ("StatusCode.CANCELLED", "Locally cancelled by application!", CancelledError),
    ("StatusCode.NOT_FOUND", "Request for unknown model: 'gemma2' is not found", ModelNotFoundError),
    ("StatusCode.UNAUTHENTICATED", "missing token", AuthenticationError),
    ("StatusCode.INTERNAL", "engine failed", ServerError),
])
def test_triton_exceptions_map_to_typed_errors(status, message, expected):
    error = from_triton(InferenceServerException(msg=message, status=status))
    assert type(error) is expected
    assert isinstance(error, GemmaClientError)
    assert error.message == str(error) == message and error.status == status


@pytest.mark.parametrize("status, expected", [
    ("INVALID_ARGUMENT", InvalidArgumentError), ("UNAVAILABLE", UnavailableError), ("CANCELLED", CancelledError),
    ("DEADLINE_EXCEEDED", DeadlineExceededError), ("NOT_FOUND", ModelNotFoundError), ("INTERNAL", ServerError),
])
def test_in_band_errors_are_typed_by_their_status_tag(status, expected):
    """A stream error arrives without a gRPC status; the model's tag carries it (protocol.tag_error)."""
    error = from_triton(InferenceServerException(msg=protocol.tag_error(status, "what happened")))
    assert type(error) is expected
    assert error.message == "what happened" and error.status == f"StatusCode.{status}"


@pytest.mark.parametrize("message, expected", [
    ("Locally cancelled by application!", CancelledError),
    ("Request for unknown model: 'x' is not found", ModelNotFoundError),
    ("8 requests are already waiting; retry later", UnavailableError),
    ("'max_tokens' must be >= 1, got 0", InvalidArgumentError),
    ("'text_input' is empty", InvalidArgumentError),
    ("prompt (2 tokens) + max_tokens (5000) = 5002 exceeds the context of 2048 tokens", InvalidArgumentError),
    ("request cancelled", CancelledError),
    ("something nobody anticipated", ServerError),
])
def test_untagged_in_band_errors_fall_back_to_known_phrases(message, expected):
    error = from_triton(InferenceServerException(msg=message))
    assert type(error) is expected and error.message == message and error.status is None


def test_tags_and_statuses_round_trip():
    assert protocol.split_error_status(protocol.tag_error("UNAVAILABLE", "[x] y")) == ("UNAVAILABLE", "[x] y")
    assert protocol.split_error_status("[NOT_A_STATUS] y") == (None, "[NOT_A_STATUS] y")
    with pytest.raises(ValueError):
        protocol.tag_error("INVALID_ARG", "TritonError's name, not gRPC's")


def test_error_classes_fit_python_hierarchy():
    assert issubclass(InvalidArgumentError, ValueError)
    assert issubclass(DeadlineExceededError, TimeoutError)
    codes = [cls.exit_code for cls in (GemmaClientError, InvalidArgumentError, ConnectionFailedError,
                                       UnavailableError, DeadlineExceededError, CancelledError,
                                       ModelNotFoundError, AuthenticationError, ServerError)]
    assert len(set(codes)) == len(codes) and 0 not in codes and 2 not in codes


def test_connection_refused_sync():
    client = GemmaClient(f"127.0.0.1:{closed_port()}")
    with pytest.raises(ConnectionFailedError, match="(?i)connect"):
        client.generate("hi", max_tokens=1)
    with pytest.raises(ConnectionFailedError):
        next(client.stream("hi"))
    with pytest.raises(ConnectionFailedError):
        client.check_ready()
    assert client.is_ready() is False


def test_unresolvable_host_is_a_connection_failure():
    with pytest.raises(ConnectionFailedError):
        GemmaClient("no-such-host.invalid:8001").generate("hi")


def test_connection_refused_async():
    async def main():
        async with AsyncGemmaClient(f"127.0.0.1:{closed_port()}") as client:
            with pytest.raises(ConnectionFailedError):
                await client.generate("hi")
            with pytest.raises(ConnectionFailedError):
                async for _ in client.stream("hi"):
                    pass
            assert await client.is_ready() is False
    asyncio.run(main())


def test_retries_connection_failures_with_backoff():
    client = GemmaClient(f"127.0.0.1:{closed_port()}", retries=2, retry_backoff=0.1)
    start = time.monotonic()
    with pytest.raises(ConnectionFailedError):
        client.generate("hi")
    assert time.monotonic() - start >= 0.1 + 0.2  # two retries, the second after a doubled wait


def test_argument_errors_are_raised_before_connecting():
    client = GemmaClient(f"127.0.0.1:{closed_port()}")
    with pytest.raises(InvalidArgumentError, match="max_tokens"):
        client.generate("hi", max_tokens="ten")
    with pytest.raises(InvalidArgumentError, match="unknown sampling"):
        client.stream("hi", max_token=3)  # raised at the call, not at the first next()
    with pytest.raises(InvalidArgumentError):
        AsyncGemmaClient("localhost:1").stream("hi", temperature="warm")
    with pytest.raises(ValueError):
        GemmaClient("localhost:1", retries=-1)
