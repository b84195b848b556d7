"""``Locks``: names held and released on every backend; on PostgreSQL (SQLite serves one node), a
name held excludes every other node, and its locks are cancelled and lost cleanly."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest

from . import TTL, Clock, Opener

pytestmark = pytest.mark.anyio


async def test_a_released_name_is_held_again_and_no_loss_is_reported(backend: tuple[Opener, Clock]) -> None:
    open_store, _ = backend
    ours, theirs = await open_store(), await open_store()
    lost: list[bool] = []
    ours.on_lock_loss(lambda: lost.append(True))
    with anyio.fail_after(5):
        async with ours.hold("session:s1"), theirs.hold("session:s2"):  # another name never waits
            pass
        async with theirs.hold("session:s1"):  # released: another node enters
            pass
        async with ours.hold("session:s1"):
            pass
    assert lost == []


async def test_a_held_name_excludes_every_other_node_until_released(postgres_server: Any) -> None:
    from droidpool.store.postgres import PostgresStore

    url = postgres_server.database()
    nodes = [PostgresStore(url, TTL) for _ in range(3)]
    for node in nodes:
        await node.open()
    try:
        inside: list[int] = []
        overlaps: list[int] = []

        async def work(node: PostgresStore, index: int) -> None:
            for _ in range(5):
                async with node.hold("session:s1"):
                    inside.append(index)
                    if len(inside) > 1:
                        overlaps.append(index)
                    await anyio.sleep(0.01)
                    inside.remove(index)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for index, node in enumerate(nodes):
                    tg.start_soon(work, node, index)
                async with nodes[0].hold("session:other"):  # another name is never held up
                    pass
        assert overlaps == []
        async with nodes[1].hold("session:s1"):
            await nodes[1].close()  # the node dies holding it: PostgreSQL lets it go
        with anyio.fail_after(5):
            async with nodes[2].hold("session:s1"):
                pass
    finally:
        for node in nodes:
            await node.close()


async def test_waits_cancelled_at_any_moment_leave_no_lock_held(postgres_server: Any) -> None:
    """A cancelled waiter never keeps a lock the server granted just as it was cancelled."""
    import random

    from droidpool.store.postgres import PostgresStore

    url = postgres_server.database()
    ours, theirs = PostgresStore(url, TTL), PostgresStore(url, TTL)
    await ours.open()
    await theirs.open()
    rng = random.Random(5)
    try:
        for index in range(200):
            with anyio.move_on_after(rng.random() * 0.003):
                async with ours.hold(f"name-{index % 7}"):
                    await anyio.lowlevel.checkpoint()
        for index in range(7):
            with anyio.fail_after(3):
                async with theirs.hold(f"name-{index}"):
                    pass
        assert ours._locks is not None and ours._locks.lost == 0
    finally:
        await ours.close()
        await theirs.close()


async def test_a_node_hears_when_its_lock_connection_dies(postgres_server: Any) -> None:
    import asyncpg

    from droidpool.store.postgres import PostgresStore

    url = postgres_server.database()
    node, other = PostgresStore(url, TTL), PostgresStore(url, TTL)
    await node.open()
    await other.open()
    lost = anyio.Event()
    node.on_lock_loss(lost.set)
    try:
        async with node.hold("session:s1"):
            assert node._locks is not None and node._locks._conn is not None
            admin = await asyncpg.connect(url)
            await admin.execute("SELECT pg_terminate_backend($1)", node._locks._conn.get_server_pid())
            await admin.close()
            with anyio.fail_after(5):
                await lost.wait()  # the turns holding locks are told, and stop
            with anyio.fail_after(5):
                async with other.hold("session:s1"):  # indeed: another node can enter now
                    pass
        assert node._locks.lost == 1  # and the release says so
        with anyio.fail_after(5):
            async with node.hold("session:s1"):  # a new connection serves the next holders
                pass
    finally:
        await node.close()
        await other.close()
