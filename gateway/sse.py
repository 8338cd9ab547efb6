"""Server-sent events as the OpenAI API frames them: `data: <json>` blocks, then `data: [DONE]`."""
from __future__ import annotations

import json
from typing import AsyncIterator, Awaitable, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class EventStream(StreamingResponse):
    """A `text/event-stream` response of `events` (bytes, each a whole event); `release()` runs when
    it ends, however it ends.

    Starlette stops sending when the client disconnects (it listens for http.disconnect while it
    streams). `release` is what cancels the Triton requests then: `events` itself may never have
    started (the client left before the first byte), so its own `finally` is not enough.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], release: Callable[[], Awaitable[None]]):
        # No caching or proxy buffering: each event must reach the client when it is sent.
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
            await self._release()
