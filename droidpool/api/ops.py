"""Operations routes: health and readiness probes, Prometheus metrics, and the model list."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from droidpool import errors
from droidpool.core import status
from droidpool.core.catalog import Listed

from .context import METRICS, TURNS, json_response
from .metrics import CONTENT_TYPE


def openai_model(model: Listed, extension: dict[str, Any]) -> dict[str, Any]:
    return {"id": model.id, "object": "model", "created": 0, "owned_by": "droid", "droidpool": extension}


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ready, body = await status.readiness(request.app[TURNS])
    return json_response(body, 200 if ready else 503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    if metrics is None:
        raise errors.NotFound("Metrics are not enabled.")
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/metrics", metrics_endpoint)
    router.add_get("/healthz", healthz)
    router.add_get("/readyz", readyz)
