"""What the service reports about itself: readiness (the pool, the store, client tools, this node)."""

from __future__ import annotations

from typing import Any

import anyio

from .service import TurnService


async def store_reachable(service: TurnService, timeout_s: float = 1.0) -> bool:
    """One small query within ``timeout_s``."""
    try:
        with anyio.fail_after(timeout_s):
            await service.store.get("")
    except Exception:  # noqa: BLE001 - any failure means not reachable
        return False
    return True


async def readiness(service: TurnService) -> tuple[bool, dict[str, Any]]:
    """Whether the service can serve turns, and what ``/readyz`` shows of it."""
    pool, broker, cluster = service.pool, service.broker, service.cluster
    body: dict[str, Any] = {"ready": pool.ready, "workers": pool.counts(), "max_workers": pool.max_workers,
                            "sessions": pool.sessions_status(),
                            "client_tools": {"enabled": broker.enabled, "offered": broker.offered,
                                             "parked": len(service.parking)}}
    store_ok = await store_reachable(service)
    body["store"] = {"backend": type(service.store).__name__.removesuffix("Store").lower(), "ok": store_ok}
    if cluster is not None:
        now = cluster.clock()
        body["node"] = {"id": cluster.node_id, "state": cluster.state,
                        "alive": sorted(n.node_id for n in cluster.nodes.values()
                                        if n.state == "serving" and now - n.heartbeat_at <= cluster.dead_after_s)}
    ready = pool.ready and store_ok
    if not ready:
        body["cause"] = (pool.last_spawn_error or "shutting down") if not pool.ready else "the store is unreachable"
    return ready, body
