"""droidpool's internal MCP endpoint (streamable HTTP): how droid reaches a client's tools.

It listens on 127.0.0.1 only, on a port of its own (never the public listener), and each session
has an unguessable bearer token (``core/tools.py``). It lists the tools of the request that owns
the session, tells droid when they change (``notifications/tools/list_changed`` on the GET
stream), and answers ``tools/call`` with the result the client sent. A small JSON-RPC handler:
``initialize``, ``ping``, ``tools/list``, ``tools/call``, notifications.
"""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from aiohttp import web

from droidpool import __version__
from droidpool.core.tools import SessionTools, ToolBroker

log = structlog.get_logger(__name__)

PROTOCOL_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")  # droid 0.225.2 asks 2025-11-25
BROKER: web.AppKey[ToolBroker] = web.AppKey("broker", ToolBroker)
MAX_BODY = 8 * 1024 * 1024  # droid's requests: tools/call arguments, never attachments


def _entry(request: web.Request) -> SessionTools:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    entry = request.app[BROKER].by_token(token.strip()) if scheme.lower() == "bearer" else None
    if entry is None:
        raise web.HTTPUnauthorized(text="unknown MCP token")
    return entry


def _result(message_id: Any, result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": message_id, "result": result}


def _error(message_id: Any, code: int, text: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": message_id, "error": {"code": code, "message": text}}


def handle(broker: ToolBroker, entry: SessionTools, message: Any) -> dict[str, Any] | None:
    """One JSON-RPC message from droid; the response (None for a notification or a response)."""
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return _error(None, -32600, "not a JSON-RPC 2.0 message")
    method, message_id = message.get("method"), message.get("id")
    if method is None or message_id is None:
        return None  # a notification (initialized, cancelled), or a response to us: nothing to say
    raw = message.get("params")
    params: dict[str, Any] = raw if isinstance(raw, dict) else {}
    if method == "initialize":
        asked = params.get("protocolVersion")
        version = asked if asked in PROTOCOL_VERSIONS else PROTOCOL_VERSIONS[0]
        return _result(message_id, {"protocolVersion": version, "capabilities": {"tools": {"listChanged": True}},
                                    "serverInfo": {"name": "droidpool", "version": __version__}})
    if method == "ping":
        return _result(message_id, {})
    if method == "tools/list":
        return _result(message_id, {"tools": broker.listing(entry)})
    if method == "tools/call":
        name = params.get("name")
        if not isinstance(name, str):
            return _error(message_id, -32602, "tools/call needs a name")
        arguments = params.get("arguments")
        content, is_error = broker.call(entry, name, arguments if isinstance(arguments, dict) else {})
        log.info("mcp.tools_call", tool=name, is_error=is_error)
        return _result(message_id, {"content": content, "isError": is_error})
    return _error(message_id, -32601, f"method not found: {method}")


async def post(request: web.Request) -> web.StreamResponse:
    entry = _entry(request)
    try:
        payload = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return web.json_response(_error(None, -32700, "parse error"), status=400, dumps=lambda v: orjson.dumps(v).decode())
    broker = request.app[BROKER]
    messages = payload if isinstance(payload, list) else [payload]
    answers = [a for a in (handle(broker, entry, m) for m in messages) if a is not None]
    if not answers:
        return web.Response(status=202)
    body = answers if isinstance(payload, list) else answers[0]
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def stream(request: web.Request) -> web.StreamResponse:
    """Server-to-client messages (tools/list_changed), as SSE, for as long as droid listens."""
    entry = _entry(request)
    broker = request.app[BROKER]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    send, receive = broker.listen(entry)
    try:
        async with receive:
            async for data in receive:
                await response.write(b"event: message\ndata: " + data + b"\n\n")
    except (ConnectionResetError, OSError):
        pass
    finally:
        broker.unlisten(entry, send)
    return response


async def delete(request: web.Request) -> web.Response:
    _entry(request)
    return web.Response(status=204)


def build_mcp_app(broker: ToolBroker) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app[BROKER] = broker
    app.router.add_post("/mcp", post)
    app.router.add_get("/mcp", stream)
    app.router.add_delete("/mcp", delete)
    return app
