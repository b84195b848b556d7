"""``NodeRegistry``: nodes register and beat, hold sessions, hand them off and leave."""

from __future__ import annotations

import pytest

from droidpool.store.base import NodeRow

from . import Clock, Opener

pytestmark = pytest.mark.anyio


async def test_nodes_register_and_hold_sessions(backend: tuple[Opener, Clock]) -> None:
    open_store, clock = backend
    a, b = await open_store(), await open_store()
    await a.heartbeat(NodeRow("node-a", "http://127.0.0.1:1", 4, clock.now, clock.now))
    await b.heartbeat(NodeRow("node-b", "http://127.0.0.1:2", 2, clock.now, clock.now))
    await a.heartbeat(NodeRow("node-a", "http://127.0.0.1:1", 4, clock.now, clock.now + 5, "draining"))
    for session in ("s1", "s2"):
        await a.create(session, "m")
        await a.claim(session, "node-a")
    nodes = {n.node_id: n for n in await b.nodes(sessions=True)}
    assert (nodes["node-a"].heartbeat_at, nodes["node-a"].state, nodes["node-a"].sessions) == (clock.now + 5,
                                                                                                 "draining", 2)
    assert nodes["node-b"].sessions == 0
    assert (await b.get("s1")).node_id == "node-a"  # type: ignore[union-attr]
    await b.claim("s1", "node-b")  # node b takes s1 over
    assert await a.release_node("node-a") == 1
    assert (await b.get("s2")).node_id is None  # type: ignore[union-attr]
    await a.remove_node("node-a")
    assert [n.node_id for n in await b.nodes()] == ["node-b"]
