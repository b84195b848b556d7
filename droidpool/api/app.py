"""The aiohttp application: routes of every dialect, request ids, keys, errors in the caller's envelope."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from droidpool import errors
from droidpool.core.access import ANONYMOUS, Authenticator
from droidpool.core.turns import TurnService
from droidpool.pool.pool import Pool
from droidpool.store.base import SessionStore

from . import ops, sessions
from .context import (
    AUTH,
    BODY_TIMEOUT_S,
    DEFAULT_AUTONOMY,
    KEEPALIVE_S,
    METRICS,
    POOL,
    PRINCIPAL,
    REQUEST_ID,
    STORE,
    TURNS,
    json_response,
)
from .dialect import Dialect
from .metrics import Metrics
from .openai_chat import DIALECT as CHAT
from .openai_wire import error_body as openai_error_body
from .turns import serve_turn

log = structlog.get_logger(__name__)

# Probes answer without a key: a load balancer or systemd check has none.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ErrorBody = Callable[[errors.DroidpoolError], tuple[int, dict[str, Any]]]

_HTTP_ERRORS: dict[int, type[errors.DroidpoolError]] = {
    404: errors.NotFound,
    405: errors.MethodNotAllowed,
    413: errors.PayloadTooLarge,
}


def error_body_for(request: web.Request) -> ErrorBody:
    """The caller's error envelope: by route, and for shared routes by the client's headers."""
    return openai_error_body


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
        except Exception:
            log.exception("http.unhandled_error", path=request.path)
            response = error_response(request, errors.InternalError("Internal error; see the droidpool log."))
        if not response.prepared:
            response.headers["X-Request-Id"] = request_id
        return response
    finally:
        structlog.contextvars.unbind_contextvars("request_id")


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


def build_app(
    turns: TurnService,
    pool: Pool,
    store: SessionStore,
    *,
    max_body_bytes: int,
    keepalive_s: float,
    body_timeout_s: float = 30.0,
    auth: Authenticator | None = None,
    metrics: Metrics | None = None,
    default_autonomy: str = "off",
) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes, middlewares=[error_middleware, auth_middleware])
    app[TURNS] = turns
    app[POOL] = pool
    app[STORE] = store
    app[KEEPALIVE_S] = keepalive_s
    app[BODY_TIMEOUT_S] = body_timeout_s
    app[AUTH] = auth or Authenticator([])
    app[METRICS] = metrics
    app[DEFAULT_AUTONOMY] = default_autonomy
    app.router.add_post("/v1/chat/completions", turn_route(CHAT))
    ops.add_routes(app.router)
    sessions.add_routes(app.router)
    return app
