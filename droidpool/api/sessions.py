"""droidpool's own session routes: list, show, delete and fork droid sessions."""

from __future__ import annotations

from aiohttp import web

from droidpool import errors
from droidpool.core import conversation
from droidpool.core.access import access_for
from droidpool.core.sessions import MAX_LIST_LIMIT

from .context import DEFAULT_AUTONOMY, PRINCIPAL, TURNS, json_response, read_json

DEFAULT_LIST_LIMIT = 100


async def list_sessions(request: web.Request) -> web.Response:
    sessions = request.app[TURNS].sessions
    records, has_more = await sessions.listing(request[PRINCIPAL].name, _limit(request.query.get("limit")),
                                               request.query.get("after") or None,
                                               request.query.get("conversation_id"))
    return json_response({
        "object": "list",
        "data": [r.public(sessions.ttl_s) for r in records],
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
    sessions = request.app[TURNS].sessions
    record = await sessions.owned(request.match_info["session_id"], request[PRINCIPAL].name)
    if record is None:
        raise errors.SessionNotFound(f"No session {request.match_info['session_id']!r}.")
    return json_response(record.public(sessions.ttl_s))


async def delete_session(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    access = access_for(request[PRINCIPAL], None, request.app[DEFAULT_AUTONOMY])
    if not await request.app[TURNS].delete(session_id, access):
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
    access = access_for(request[PRINCIPAL], request.headers.get("X-Droid-Autonomy") or None,
                        request.app[DEFAULT_AUTONOMY])
    record = await request.app[TURNS].fork(request.match_info["session_id"], key, access)
    return json_response(record.public(request.app[TURNS].sessions.ttl_s))


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v1/sessions", list_sessions)
    router.add_get("/v1/sessions/{session_id}", get_session)
    router.add_delete("/v1/sessions/{session_id}", delete_session)
    router.add_post("/v1/sessions/{session_id}/fork", fork_session)
