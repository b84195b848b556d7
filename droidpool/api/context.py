"""What every route shares: the app's typed keys, request keys, and reading and writing JSON."""

from __future__ import annotations

from typing import Any

import aiohttp
import aiohttp.http_exceptions
import anyio
import orjson
from aiohttp import web

from droidpool import errors
from droidpool.core.access import Authenticator, Principal
from droidpool.core.service import TurnService

from .browser import BrowserPolicy
from .metrics import Metrics

TURNS: web.AppKey[TurnService] = web.AppKey("turns", TurnService)
KEEPALIVE_S: web.AppKey[float] = web.AppKey("keepalive_s", float)
BODY_TIMEOUT_S: web.AppKey[float] = web.AppKey("body_timeout_s", float)
AUTH: web.AppKey[Authenticator] = web.AppKey("auth", Authenticator)
METRICS: web.AppKey[Metrics | None] = web.AppKey("metrics")
DEFAULT_AUTONOMY: web.AppKey[str] = web.AppKey("default_autonomy", str)
BROWSER: web.AppKey[BrowserPolicy] = web.AppKey("browser", BrowserPolicy)
HTTP_CLIENT: web.AppKey[aiohttp.ClientSession] = web.AppKey("http_client", aiohttp.ClientSession)  # forwards
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal", Principal)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


async def read_json(request: web.Request) -> Any:
    try:
        with anyio.fail_after(request.app[BODY_TIMEOUT_S]):
            raw = await request.read()
    except TimeoutError:
        raise errors.RequestTimeout(
            f"The request body did not arrive within {request.app[BODY_TIMEOUT_S]:g} s."
        ) from None
    except aiohttp.http_exceptions.HttpProcessingError as exc:  # a body its Content-Encoding does not fit
        raise errors.InvalidRequest(f"The request body cannot be read: {type(exc).__name__}.") from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise errors.InvalidRequest(f"The request body is not valid JSON: {exc}") from None
