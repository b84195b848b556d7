"""The aiohttp application: routes of every dialect, request ids, keys, errors in the caller's envelope."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import anyio.to_thread
import structlog
from aiohttp import web

from droidpool import errors
from droidpool.core.access import ANONYMOUS, Authenticator
from droidpool.core.service import TurnService

from . import anthropic, browser, ops, responses, sessions, usage
from .browser import BrowserPolicy
from .context import (
    AUTH,
    BODY_TIMEOUT_S,
    BROWSER,
    DEFAULT_AUTONOMY,
    HTTP_CLIENT,
    KEEPALIVE_S,
    METRICS,
    PRINCIPAL,
    REQUEST_ID,
    TURNS,
    json_response,
    read_json,
)
from .dialect import Dialect
from .forward import from_node
from .handler import serve_turn
from .metrics import Metrics
from .openai_chat import DIALECT as CHAT
from .openai_wire import error_body as openai_error_body

log = structlog.get_logger(__name__)

MODELS_WAIT_S = 10.0  # how long /v1/models waits at start-up for droid's first model list
# Probes answer without a key: a load balancer or systemd check has none.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ErrorBody = Callable[[errors.DroidpoolError], tuple[int, dict[str, Any]]]

_HTTP_ERRORS: dict[int, type[errors.DroidpoolError]] = {
    404: errors.NotFound,
    405: errors.MethodNotAllowed,
    413: errors.PayloadTooLarge,
}


def speaks_anthropic(request: web.Request) -> bool:
    """Is the caller an Anthropic client? Its routes, or on shared routes its version header."""
    if request.path.startswith("/v1/messages"):
        return True
    return "anthropic-version" in request.headers and not request.path.startswith(("/v1/chat/", "/v1/responses"))


def error_body_for(request: web.Request) -> ErrorBody:
    """The caller's error envelope: by route, and for shared routes by the client's headers."""
    if request.path.startswith("/v1/responses"):
        return responses.error_body
    return anthropic.error_body if speaks_anthropic(request) else openai_error_body


def error_response(request: web.Request, error: errors.DroidpoolError) -> web.Response:
    status, body = error_body_for(request)(error)
    return json_response(body, status, error.headers())


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves in the caller's dialect; no traceback ever reaches a client."""
    request_id = request.headers.get("X-Request-Id", "")[:128] or uuid.uuid4().hex
    structlog.contextvars.bind_contextvars(request_id=request_id)
    request[REQUEST_ID] = request_id
    try:
        try:
            response = await handler(request)
        except errors.DroidpoolError as exc:
            response = error_response(request, exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            kind = _HTTP_ERRORS.get(exc.status, errors.InvalidRequest)
            message = exc.reason if exc.status != 404 else f"No route for {request.method} {request.path}."
            if exc.status == 413:
                message = f"The request body is larger than the limit of {request.app._client_max_size} bytes."
            response = error_response(request, kind(message))
        except ConnectionResetError:
            # The client went away (mid-body, or while its answer was written): nobody to answer.
            log.info("http.client_disconnected", path=request.path)
            response = web.Response(status=499)
        except Exception:
            log.exception("http.unhandled_error", path=request.path)
            response = error_response(request, errors.InternalError("Internal error; see the droidpool log."))
        if not response.prepared:
            response.headers["X-Request-Id"] = request_id
            response.headers["request-id"] = request_id  # where Anthropic's SDK looks for it
        return response
    finally:
        structlog.contextvars.unbind_contextvars("request_id")


@web.middleware
async def browser_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Before any work: the Host must be one we answer to, an Origin must be listed, a POST body
    must be JSON; a listed origin's preflight is answered here (see ``browser.py``)."""
    policy = request.app[BROWSER]
    # A node forwarding a turn names the holder's internal address: its secret vouches for it.
    if not browser.host_allowed(policy, request.headers.get("Host")) and not from_node(request, request.app[TURNS].cluster):
        raise errors.Misdirected(f"This server does not answer to the host {browser.quoted(request.headers.get('Host'))}; "
                                 "name it in server.allowed_hosts to allow it.")
    origin = request.headers.get("Origin")
    if not browser.origin_allowed(policy, origin):
        raise errors.Forbidden(f"Requests from the origin {browser.quoted(origin)} are not allowed; list it in "
                               "server.cors_origins to allow a browser page there.", code="origin_not_allowed")
    if origin is not None and request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return web.Response(status=204, headers=browser.preflight_headers(origin, request.headers))
    if request.method == "POST" and request.body_exists and not browser.is_json(request.headers.get("Content-Type", "")):
        raise errors.UnsupportedMediaType(
            f"The request body must be JSON (Content-Type: application/json), not "
            f"{browser.quoted(request.headers.get('Content-Type'))}.")
    return await handler(request)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """A listed origin may read the response (streams included: this runs before any byte)."""
    origin = request.headers.get("Origin")
    if origin is not None and browser.origin_allowed(request.app[BROWSER], origin):
        response.headers.update(browser.response_headers(origin))


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every route but the probes needs a valid key once keys are configured (401 otherwise)."""
    if request.path in OPEN_PATHS:
        request[PRINCIPAL] = ANONYMOUS
    else:
        request[PRINCIPAL] = request.app[AUTH].authenticate(
            request.headers.get("Authorization"), request.headers.get("X-Api-Key")
        )
    return await handler(request)


def turn_route(dialect: Dialect) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await serve_turn(request, dialect)

    return handle


async def count_tokens(request: web.Request) -> web.Response:
    body = await read_json(request)
    # Off the event loop: a large context takes milliseconds to tokenize.
    return json_response(await anyio.to_thread.run_sync(anthropic.count_tokens, body))


async def list_models(request: web.Request) -> web.Response:
    """The models a client may name; each entry's ``droidpool`` field has its price multiplier, where
    the price comes from, and whether this key may use it."""
    turns = request.app[TURNS]
    await turns.models_known(MODELS_WAIT_S)
    listing = turns.catalog.listing()
    extensions = {m.id: usage.model_extension(turns.ledger, request[PRINCIPAL], m) for m in listing}
    if "anthropic-version" in request.headers or "x-api-key" in request.headers:
        page = anthropic.models_page(listing, request.query)
        for entry in page["data"]:
            entry["droidpool"] = extensions[entry["id"]]
        return json_response(page)
    return json_response({"object": "list", "data": [ops.openai_model(m, extensions[m.id]) for m in listing]})


async def get_response(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    output = await request.app[TURNS].sessions.kept_output(responses.turn_id_of(response_id, "response_id"),
                                                           request[PRINCIPAL].name)
    if output is None:
        raise errors.ResponseNotFound(f"No response {response_id!r} (unknown, not stored, deleted or expired).",
                                      param="response_id")
    return json_response(responses.stored(output))


async def delete_response(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    turn_id = responses.turn_id_of(response_id, "response_id")
    if not await request.app[TURNS].sessions.forget_output(turn_id, request[PRINCIPAL].name):
        raise errors.ResponseNotFound(f"No response {response_id!r}.", param="response_id")
    return json_response({"id": response_id, "object": "response", "deleted": True})


async def _http_client(app: web.Application) -> AsyncIterator[None]:
    """The client that forwards turns to other nodes (no pool limit: the turns bound it). A fresh
    connection each time: failing to connect then means the holder never saw the request."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                     auto_decompress=False) as http:
        app[HTTP_CLIENT] = http
        yield


def build_app(
    turns: TurnService,
    *,
    max_body_bytes: int,
    keepalive_s: float,
    body_timeout_s: float = 30.0,
    auth: Authenticator | None = None,
    metrics: Metrics | None = None,
    default_autonomy: str = "off",
    browser_policy: BrowserPolicy | None = None,
) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes,
                          middlewares=[error_middleware, browser_middleware, auth_middleware])
    app[BROWSER] = browser_policy or BrowserPolicy.of("127.0.0.1", (), ())
    app.on_response_prepare.append(add_cors_headers)
    app[TURNS] = turns
    app[KEEPALIVE_S] = keepalive_s
    app[BODY_TIMEOUT_S] = body_timeout_s
    app[AUTH] = auth or Authenticator([])
    app[METRICS] = metrics
    app[DEFAULT_AUTONOMY] = default_autonomy
    app.cleanup_ctx.append(_http_client)
    app.router.add_post("/v1/chat/completions", turn_route(CHAT))
    app.router.add_post("/v1/messages", turn_route(anthropic.DIALECT))
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/responses", turn_route(responses.DIALECT))
    app.router.add_get("/v1/responses/{response_id}", get_response)
    app.router.add_delete("/v1/responses/{response_id}", delete_response)
    ops.add_routes(app.router)
    sessions.add_routes(app.router)
    usage.add_routes(app.router)
    for route in app.router.routes():
        route._expect_handler = expect  # aiohttp runs it before any middleware: it must answer in an envelope
    return app


async def expect(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue`` is answered as aiohttp does; any other expectation gets a 417 in the
    caller's envelope (aiohttp's own answer is plain text, or a 500 when the value is not ASCII)."""
    value = request.headers.get("Expect", "")
    if value.lower() == "100-continue":
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None
    error = errors.InvalidRequest("Only the expectation 100-continue is supported.", param="Expect",
                                  code="expectation_failed")
    status, body = error_body_for(request)(error)
    return json_response(body, 417)
