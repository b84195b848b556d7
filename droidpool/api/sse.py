"""Server-Sent Events on an aiohttp response: data lines, keep-alive comments, the [DONE] end."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # reverse proxies must not buffer a token stream
}


class SSEWriter:
    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response
        self.sent_done = False

    async def send(self, payload: dict[str, Any]) -> None:
        await self.response.write(b"data: " + orjson.dumps(payload) + b"\n\n")

    async def keepalive(self) -> None:
        await self.response.write(b": keep-alive\n\n")

    async def done(self) -> None:
        if not self.sent_done:
            self.sent_done = True
            await self.response.write(b"data: [DONE]\n\n")
