"""The aiohttp application: OpenAI-compatible routes, the error envelope, request ids."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import orjson
import structlog
from aiohttp import web

from droidpool import errors
from droidpool.config import ALL_TOOL_IDS
from droidpool.core import conversation
from droidpool.core.access import ANONYMOUS, Authenticator, Principal, effective_autonomy
from droidpool.core.turns import Access, ChatService, Turn
from droidpool.pool.pool import Pool
from droidpool.store.sqlite import MAX_LIST_LIMIT, SessionStore, UnknownCursor

from .metrics import CONTENT_TYPE, Metrics
from .openai_chat import ChatRequest, Fold, parse_chat_request
from .sse import SSE_HEADERS, SSEWriter

log = structlog.get_logger(__name__)

CHAT: web.AppKey[ChatService] = web.AppKey("chat", ChatService)
POOL: web.AppKey[Pool] = web.AppKey("pool", Pool)
STORE: web.AppKey[SessionStore] = web.AppKey("store", SessionStore)
KEEPALIVE_S: web.AppKey[float] = web.AppKey("keepalive_s", float)
BODY_TIMEOUT_S: web.AppKey[float] = web.AppKey("body_timeout_s", float)
AUTH: web.AppKey[Authenticator] = web.AppKey("auth", Authenticator)
METRICS: web.AppKey[Metrics | None] = web.AppKey("metrics")
DEFAULT_AUTONOMY: web.AppKey[str] = web.AppKey("default_autonomy", str)
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal", Principal)
TURN: web.RequestKey[Turn] = web.RequestKey("turn", Turn)  # set once a turn has started

# Probes answer without a key: a load balancer or systemd check has none.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})

DEFAULT_LIST_LIMIT = 100

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def error_response(error: errors.DroidpoolError) -> web.Response:
    return json_response(error.body(), error.status, error.headers())


_HTTP_ERRORS: dict[int, type[errors.DroidpoolError]] = {
    404: errors.NotFound,
    405: errors.MethodNotAllowed,
    413: errors.PayloadTooLarge,
}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves in the OpenAI envelope; no traceback ever reaches a client."""
    request_id = request.headers.get("X-Request-Id", "")[:128] or uuid.uuid4().hex
    structlog.contextvars.bind_contextvars(request_id=request_id)
    request[REQUEST_ID] = request_id
    try:
        try:
            response = await handler(request)
        except errors.DroidpoolError as exc:
            response = error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            kind = _HTTP_ERRORS.get(exc.status, errors.InvalidRequest)
            message = exc.reason if exc.status != 404 else f"No route for {request.method} {request.path}."
            if exc.status == 413:
                message = f"The request body is larger than the limit of {request.app._client_max_size} bytes."
            response = json_response(errors.DroidpoolError.body(kind(message)), exc.status)
        except Exception:
            log.exception("http.unhandled_error", path=request.path)
            response = error_response(errors.InternalError("Internal error; see the droidpool log."))
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


def access_for(request: web.Request) -> Access:
    """The session settings and scope a request's key gives it."""
    principal = request[PRINCIPAL]
    autonomy = effective_autonomy(principal, request.headers.get("X-Droid-Autonomy") or None,
                                  request.app[DEFAULT_AUTONOMY])
    if principal is ANONYMOUS:
        return Access(owner="", autonomy=autonomy)
    disabled = tuple(t for t in ALL_TOOL_IDS if t not in principal.tools)
    return Access(owner=principal.name, autonomy=autonomy, disabled_tool_ids=disabled)


async def read_json(request: web.Request) -> Any:
    try:
        with anyio.fail_after(request.app[BODY_TIMEOUT_S]):
            raw = await request.read()
    except TimeoutError:
        raise errors.RequestTimeout(
            f"The request body did not arrive within {request.app[BODY_TIMEOUT_S]:g} s."
        ) from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise errors.InvalidRequest(f"The request body is not valid JSON: {exc}") from None


# --- chat completions ----------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    chat = request.app[CHAT]
    started = time.monotonic()
    body = await read_json(request)
    chat_request = parse_chat_request(body, request.headers.get("X-Session-Id") or None)
    key = _conversation_key(body, request.headers.get("X-Conversation-Id"))
    chat_request = dataclasses.replace(
        chat_request, ignored=tuple(p for p in chat_request.ignored if p != "conversation_id")
    )
    principal = request[PRINCIPAL]
    if not principal.allows_model(chat_request.model):
        raise errors.Forbidden(f"This API key may not use the model {chat_request.model!r}.",
                               param="model", code="model_not_allowed")
    access = access_for(request)
    fold = Fold(f"chatcmpl-{uuid.uuid4().hex[:24]}", chat_request.model)
    status = "ok"
    http_status = 200
    try:
        with request.app[AUTH].admit(principal):
            return await _complete(request, chat, chat_request, key, access, fold)
    except errors.DroidpoolError as exc:
        status, http_status = exc.type, exc.status
        raise
    except ConnectionResetError:
        status, http_status = "client_disconnected", 499
        raise
    finally:
        turn_started = request.get(TURN)
        session_id = turn_started.session_id if turn_started else None
        if fold.completed is not None and fold.failure() is not None and http_status == 200:
            failure = fold.failure()
            assert failure is not None
            status, http_status = failure.type, failure.status
        ttft = (turn_started.first_token_at - started) if turn_started and turn_started.first_token_at else None
        duration = time.monotonic() - started
        metrics = request.app[METRICS]
        if metrics is not None:
            metrics.observe(status=http_status, stream=chat_request.stream, duration_s=duration, ttft_s=ttft,
                            input_tokens=fold.usage.input_tokens, output_tokens=fold.usage.output_tokens,
                            cache_read_tokens=fold.usage.cache_read_tokens,
                            thinking_tokens=fold.usage.thinking_tokens)
        log.info(
            "chat.completion",
            model=chat_request.model,
            key=principal.name or None,
            session=session_id,
            conversation=key,
            stream=chat_request.stream,
            status=status,
            http_status=http_status,
            ttft_s=round(ttft, 4) if ttft is not None else None,
            duration_s=round(duration, 4),
            worker=turn_started.worker.id if turn_started else None,
            prompt_tokens=fold.usage.input_tokens,
            completion_tokens=fold.usage.output_tokens,
        )


async def _complete(
    request: web.Request, chat: ChatService, chat_request: ChatRequest, key: str | None, access: Access, fold: Fold
) -> web.StreamResponse:
    """Run the turn and answer: a stream, or one JSON body."""
    async with chat.turn(chat_request, key, access) as turn:
        request[TURN] = turn
        headers = _turn_headers(request, turn, chat_request, key)
        if chat_request.stream:
            return await _stream(request, chat, chat_request, turn, fold, headers)
        async for event in turn.events(request.app[KEEPALIVE_S]):
            if event is not None:
                fold.feed(event)
        failure = fold.failure()
        if failure is not None:
            response = error_response(failure)
            response.headers.update(headers)
            return response
        await chat.record(turn, chat_request, fold.text, fold.usage)
        return json_response(fold.completion(), headers=headers)


def _conversation_key(body: Any, header: str | None) -> str | None:
    """The client's conversation id: the body's ``conversation_id`` wins over the header."""
    from_body = body.get("conversation_id")
    param = "conversation_id" if from_body is not None else "X-Conversation-Id"
    try:
        return conversation.conversation_key(from_body if from_body is not None else header)
    except conversation.BadKey as exc:
        raise errors.InvalidRequest(f"'{param}' {exc}.", param="conversation_id") from None


def _turn_headers(
    request: web.Request, turn: Turn, chat_request: ChatRequest, key: str | None
) -> dict[str, str]:
    headers = {"X-Session-Id": turn.session_id}
    if key is not None:
        headers["X-Conversation-Id"] = key
    if chat_request.ignored:
        headers["X-Droidpool-Ignored-Params"] = ",".join(chat_request.ignored)
    return headers


async def _stream(
    request: web.Request,
    chat: ChatService,
    chat_request: ChatRequest,
    turn: Turn,
    fold: Fold,
    headers: dict[str, str],
) -> web.StreamResponse:
    response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
    response.headers["X-Request-Id"] = request[REQUEST_ID]
    await response.prepare(request)
    sse = SSEWriter(response)
    await sse.send(fold.chunk({"role": "assistant", "content": ""}))
    try:
        async for event in turn.events(request.app[KEEPALIVE_S]):
            if event is None:
                await sse.keepalive()
                continue
            for delta in fold.feed(event):
                await sse.send(fold.chunk(delta))
        failure = fold.failure()
        if failure is not None:
            await sse.send(failure.body())
        else:
            await chat.record(turn, chat_request, fold.text, fold.usage)
            await sse.send(fold.chunk({}, finish_reason="stop"))
            if chat_request.include_usage:
                await sse.send(fold.usage_chunk())
    except errors.DroidpoolError as exc:
        # The 200 is already sent: the error goes in-band, then the stream ends normally.
        await sse.send(exc.body())
    await sse.done()
    await response.write_eof()
    return response


# --- models, health, sessions ---------------------------------------------------------------


async def list_models(request: web.Request) -> web.Response:
    data = [
        {"id": m["id"], "object": "model", "created": 0, "owned_by": "droid"}
        for m in request.app[CHAT].models()
    ]
    return json_response({"object": "list", "data": data})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    body = {"ready": pool.ready, "workers": pool.counts(), "max_workers": pool.max_workers}
    if not pool.ready:
        body["cause"] = pool.last_spawn_error or "shutting down"
    return json_response(body, 200 if pool.ready else 503)


async def list_sessions(request: web.Request) -> web.Response:
    store = request.app[STORE]
    owner = request[PRINCIPAL].name
    key = request.query.get("conversation_id")
    if key is not None:
        record = await store.by_key(key, owner)
        records, has_more = ([record] if record else []), False
    else:
        try:
            page = await store.page(_limit(request.query.get("limit")), request.query.get("after") or None,
                                    owner=owner)
        except UnknownCursor:
            raise errors.InvalidRequest(
                f"'after' names no session: {request.query['after']!r}.", param="after"
            ) from None
        records, has_more = page.records, page.has_more
    return json_response({
        "object": "list",
        "data": [r.public(store.ttl_s) for r in records],
        "first_id": records[0].session_id if records else None,
        "last_id": records[-1].session_id if records else None,
        "has_more": has_more,
    })


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIST_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise errors.InvalidRequest(f"'limit' must be an integer from 1 to {MAX_LIST_LIMIT}.", param="limit")
    return limit


async def get_session(request: web.Request) -> web.Response:
    store = request.app[STORE]
    record = await store.get(request.match_info["session_id"])
    if record is None or record.owner != request[PRINCIPAL].name:
        raise errors.SessionNotFound(f"No session {request.match_info['session_id']!r}.")
    return json_response(record.public(store.ttl_s))


async def delete_session(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    if not await request.app[CHAT].delete(session_id, access_for(request)):
        raise errors.SessionNotFound(f"No session {session_id!r}.")
    return json_response({"id": session_id, "object": "droidpool.session", "deleted": True})


async def fork_session(request: web.Request) -> web.Response:
    body = await read_json(request) if request.can_read_body else {}
    if not isinstance(body, dict):
        raise errors.InvalidRequest("The request body must be a JSON object.")
    try:
        key = conversation.conversation_key(body.get("conversation_id"))
    except conversation.BadKey as exc:
        raise errors.InvalidRequest(f"'conversation_id' {exc}.", param="conversation_id") from None
    record = await request.app[CHAT].fork(request.match_info["session_id"], key, access_for(request))
    return json_response(record.public(request.app[STORE].ttl_s))


async def metrics_endpoint(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    if metrics is None:
        raise errors.NotFound("Metrics are not enabled.")
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def build_app(
    chat: ChatService,
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
    app[CHAT] = chat
    app[POOL] = pool
    app[STORE] = store
    app[KEEPALIVE_S] = keepalive_s
    app[BODY_TIMEOUT_S] = body_timeout_s
    app[AUTH] = auth or Authenticator([])
    app[METRICS] = metrics
    app[DEFAULT_AUTONOMY] = default_autonomy
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/sessions", list_sessions)
    app.router.add_get("/v1/sessions/{session_id}", get_session)
    app.router.add_delete("/v1/sessions/{session_id}", delete_session)
    app.router.add_post("/v1/sessions/{session_id}/fork", fork_session)
    return app
