"""Server-Sent Events on an aiohttp response: named or unnamed events, comments, one write each."""

from __future__ import annotations

from collections.abc import Iterable

import orjson
from aiohttp import web

from .dialect import Event

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # reverse proxies must not buffer a token stream
}


def encode(event: Event) -> bytes:
    if isinstance(event.data, str):
        if event.data.startswith(":"):
            return event.data.encode() + b"\n\n"
        payload = event.data.encode()
    else:
        payload = orjson.dumps(event.data)
    head = f"event: {event.name}\n".encode() if event.name else b""
    return head + b"data: " + payload + b"\n\n"


class SSEWriter:
    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response

    async def send(self, events: Iterable[Event]) -> None:
        data = b"".join(encode(e) for e in events)
        if data:
            await self.response.write(data)
