"""Every failure as OpenAI's error body: {"error": {"message", "type", "param", "code"}}.

Status codes: a request the gateway or Triton refuses (INVALID_ARGUMENT) is 400; a full engine
queue (UNAVAILABLE) is 503 with Retry-After, as OpenAI answers "the engine is currently
overloaded" (429 means the caller's own rate limit there, and some clients don't retry it; the
openai SDK retries 503); an unreachable or not-ready Triton is 503 too; an engine fault is 500.
"""
from __future__ import annotations

import re
from typing import Optional

from fastapi.responses import JSONResponse
from gemma_client import (CancelledError, ConnectionFailedError, DeadlineExceededError, GemmaClientError,
                          InvalidArgumentError, ModelNotFoundError, UnavailableError)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
RETRY_AFTER_S = 1


class APIError(Exception):
    """An error response; raise it anywhere in a request and app.py answers with it."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or (INVALID_REQUEST if status < 500 else SERVER_ERROR)
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid_request(message: str, param: Optional[str] = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def from_client_error(error: GemmaClientError, prompt_param: str,
                      constraint_param: Optional[str] = None) -> APIError:
    """The HTTP answer to a failed Triton request. `prompt_param` is the request field that held the
    prompt ("prompt" or "messages"): Triton's messages call it 'text_input'. `constraint_param` the
    one that asked for a constraint ("response_format", "tools"): Triton's call it
    'structured_outputs' (an invalid schema, with the grammar library's message)."""
    message = error.message
    if isinstance(error, InvalidArgumentError):
        if "exceeds the context" in message or "exceeds the whole KV cache" in message:
            # As OpenAI: the prompt is named, whichever of prompt and max_tokens was too long.
            return invalid_request(message, param=prompt_param, code="context_length_exceeded")
        if constraint_param is not None and "structured_outputs" in message:
            return invalid_request(f"invalid '{constraint_param}': {message}", param=constraint_param)
        return invalid_request(message, param=_param_named_in(message, prompt_param))
    if isinstance(error, UnavailableError):
        return APIError(503, message, code="overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(error, (ConnectionFailedError, ModelNotFoundError, CancelledError)):
        return APIError(503, f"the model server is not available: {message}", code="model_unavailable",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(error, DeadlineExceededError):
        return APIError(504, message, code="timeout")
    return APIError(500, message, code="engine_error")


def _param_named_in(message: str, prompt_param: str) -> Optional[str]:
    # The model's messages name the field first, quoted: "'top_p' must be in (0, 1]".
    quoted = re.search(r"'(\w+)'", message)
    name = quoted.group(1) if quoted else None
    return prompt_param if name == "text_input" else name
