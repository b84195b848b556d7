"""How the app is served, the same in the daemon and the tests: handler cancellation on, and
requests aiohttp refuses before any handler runs answered in an error envelope, quietly.

``HANDLER_CANCELLATION``: a client that hangs up cancels its handler at once. A request waiting
for a worker leaves the queue before it is dispatched; a running turn is interrupted instead of
running on for nobody; a parked turn whose calls never reached its client is released. Both the
daemon (``make_runner``) and the test harness (``TestServer`` over ``make_runner``) use it, so the
tests take the path production takes.
"""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from droidpool import errors

from . import anthropic, openai_wire

log = structlog.get_logger(__name__)

HANDLER_CANCELLATION = True
_REASONS = {
    "LineTooLong": "a request line or header is too long",
    "InvalidHeader": "a header is invalid",
    "BadStatusLine": "the request line is invalid",
    "BadHttpMethod": "the request method is invalid",
    "InvalidURLError": "the request target is invalid",
    "ContentLengthError": "the body does not match its Content-Length",
    "TransferEncodingError": "the body's transfer encoding is invalid",
    "BadHttpMessage": "the request is not valid HTTP",
}


class EnvelopedHandler(RequestHandler):
    """aiohttp's connection handler, except that a request it cannot parse (bad header bytes, a bad
    request line, oversize headers) gets a JSON error body in the caller's dialect and one
    warning line, instead of a plain-text body and a traceback on stderr."""

    _head: bytes | None = None  # the start of the request being read: its request line names the route
    _last_head: bytes = b""

    def data_received(self, data: bytes) -> None:
        head = self._head or b""
        if b"\n" not in head and len(head) < 2048:  # the request line may come in several segments
            self._head = (head + data)[:2048]
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:  # a message (or a parse error) is queued: the next data is another
            self._last_head, self._head = self._head or b"", None

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        # What was wrong, in words of our own: aiohttp's message quotes the client's bytes (a header
        # that is too long may hold a credential), which go neither back nor to the log.
        reason = _REASONS.get(type(exc).__name__, "malformed request") if exc is not None else "malformed request"
        log.warning("http.malformed_request", status=status, reason=reason, remote=request.remote)
        if request.writer.output_size > 0:
            raise ConnectionError("the response is already under way")
        kind = errors.PayloadTooLarge if status == 413 else errors.InternalError if status >= 500 \
            else errors.InvalidRequest
        error = kind(f"Malformed HTTP request: {reason}", code="malformed_request" if status < 500 else None)
        path = _path(self._last_head)
        body_of = anthropic.error_body if path.startswith("/v1/messages") else openai_wire.error_body
        _, body = body_of(error)
        response = web.Response(status=status, body=orjson.dumps(body), content_type="application/json")
        response.force_close()
        return response


def _path(head: bytes) -> str:
    line = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0]
    parts = line.split(b" ")
    return parts[1].decode("latin-1") if len(parts) >= 2 else ""


class EnvelopedServer(web.Server):
    def __call__(self) -> RequestHandler:
        return EnvelopedHandler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = EnvelopedServer  # aiohttp builds a plain Server; ours makes its connections
        return server


def make_runner(app: web.Application, **kwargs: Any) -> web.AppRunner:
    """The runner that serves ``app`` (the daemon's and the tests')."""
    kwargs.setdefault("access_log", None)
    kwargs["handler_cancellation"] = HANDLER_CANCELLATION
    return Runner(app, **kwargs)
