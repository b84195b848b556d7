"""Operations routes: health and readiness probes, Prometheus metrics, and the model list."""

from __future__ import annotations

from typing import Any

import anyio
from aiohttp import web

from droidpool import errors
from droidpool.core.catalog import Listed
from droidpool.store.base import SessionStore

from .context import METRICS, POOL, STORE, TURNS, json_response
from .metrics import CONTENT_TYPE


def openai_model(model: Listed, extension: dict[str, Any]) -> dict[str, Any]:
    return {"id": model.id, "object": "model", "created": 0, "owned_by": "droid", "droidpool": extension}


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    turns = request.app[TURNS]
    body: dict[str, Any] = {"ready": pool.ready, "workers": pool.counts(), "max_workers": pool.max_workers,
                            "sessions": pool.sessions_status(),
                            "client_tools": {"enabled": turns.broker.enabled, "offered": turns.broker.offered,
                                             "parked": len(turns.parked)}}
    store_ok = await _store_reachable(request.app[STORE])
    body["store"] = {"backend": type(request.app[STORE]).__name__.removesuffix("Store").lower(), "ok": store_ok}
    cluster = turns.cluster
    if cluster is not None:
        now = cluster.clock()
        body["node"] = {"id": cluster.node_id, "state": cluster.state,
                        "alive": sorted(n.node_id for n in cluster.nodes.values()
                                        if n.state == "serving" and now - n.heartbeat_at <= cluster.dead_after_s)}
    ready = pool.ready and store_ok
    if not ready:
        body["cause"] = (pool.last_spawn_error or "shutting down") if not pool.ready else "the store is unreachable"
    return json_response(body, 200 if ready else 503)


async def _store_reachable(store: SessionStore) -> bool:
    """One small query within a second."""
    try:
        with anyio.fail_after(1.0):
            await store.get("")
    except Exception:  # noqa: BLE001 - any failure means not reachable
        return False
    return True


async def metrics_endpoint(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    if metrics is None:
        raise errors.NotFound("Metrics are not enabled.")
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/metrics", metrics_endpoint)
    router.add_get("/healthz", healthz)
    router.add_get("/readyz", readyz)
