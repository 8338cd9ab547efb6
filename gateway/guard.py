"""What every request passes before FastAPI reads it: the API key, then the body size limit.

Plain ASGI middleware, so an unauthenticated or oversized request is answered before its body is
parsed (or, past the limit, read any further).
"""
from __future__ import annotations

import hmac
from typing import Optional

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError

PROTECTED_PREFIX = "/v1/"  # /health and the API docs stay open


class Guard:
    def __init__(self, app: ASGIApp, api_key: Optional[str], max_body_bytes: int):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.api_key is not None and scope["path"].startswith(PROTECTED_PREFIX):
            refused = self._refused(headers.get("authorization"))
            if refused is not None:
                await refused.response()(scope, receive, send)
                return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body = await self._read_body(headers, receive)
            if isinstance(body, APIError):
                await body.response()(scope, receive, send)
                return
            if body is None:  # the client left while sending
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _refused(self, authorization: Optional[str]) -> Optional[APIError]:
        scheme, _, token = (authorization or "").partition(" ")
        # compare_digest: the time taken does not tell how much of the key was right.
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key):
            return None
        message = ("Incorrect API key provided" if authorization else
                   "Missing API key: send the header 'Authorization: Bearer <key>'")
        return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, headers: Headers, receive: Receive) -> bytes | APIError | None:
        too_large = APIError(413, f"request body is larger than {self.max_body_bytes} bytes",
                             code="request_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return too_large
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return too_large
            if not message.get("more_body", False):
                return bytes(body)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body read already, then the client's own messages
    (http.disconnect, which the app watches for to cancel work)."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed
