"""The store contract (``store/base.py``), one suite run against every backend: SQLite, and
PostgreSQL on a real server the tests start (tests/pgserver.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from droidpool.droid.protocol import Usage
from droidpool.store import SessionStore, SqliteStore, TurnRow, UnknownCursor
from droidpool.store.base import LedgerQuery

pytestmark = pytest.mark.anyio
TTL = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


Opener = Callable[[], Awaitable[SessionStore]]


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Opener, Clock]]:
    """Opens stores on one database (each call: another connection to it, as another node would)."""
    clock = Clock()
    opened: list[SessionStore] = []
    if request.param == "sqlite":
        def make() -> SessionStore:
            return SqliteStore(tmp_path / "s.db", TTL, clock=clock)
    else:
        from droidpool.store.postgres import PostgresStore

        url = request.getfixturevalue("postgres_server").database()

        def make() -> SessionStore:
            return PostgresStore(url, TTL, clock=clock)

    async def open_one() -> SessionStore:
        store = make()
        await store.open()
        opened.append(store)
        return store

    yield open_one, clock
    for store in opened:
        await store.close()


def turn(session_id: str, usage: Usage = Usage(3, 2), **extra: Any) -> TurnRow:
    return TurnRow(uuid.uuid4().hex, session_id, "custom:m", usage, 1.0, **extra)


async def test_sessions_are_created_continued_and_persist(backend: tuple[Opener, Clock]) -> None:
    open_store, clock = backend
    store = await open_store()
    assert await store.create("s1", "custom:m", head_digest="h0")
    assert await store.create("s1", "custom:m")  # the same session again: fine, unchanged
    await store.begin_turn("s1")
    record = await store.get("s1")
    assert record is not None and record.in_flight and not record.matchable
    first = turn("s1", Usage(10, 5, 1, 2, 3))
    await store.complete_turn(first, "h1")
    await store.complete_turn(first, "h1-again")  # a turn id is recorded once
    clock.now += 5
    await store.complete_turn(turn("s1", Usage(1, 1)), "h2")
    again = await (await open_store()).get("s1")  # another connection, as another node
    assert again is not None
    assert (again.turns, again.head_digest, again.in_flight) == (3, "h2", False)  # sessions count each call
    assert again.usage.input_tokens == 21 and again.usage.thinking_tokens == 6
    assert (await store.find_head("h2")) == again
    assert await store.find_head("h1") is None
    (total,) = await store.ledger(LedgerQuery())
    assert total.turns == 2 and total.usage.input_tokens == 11


async def test_a_conversation_id_names_one_live_session_per_owner(backend: tuple[Opener, Clock]) -> None:
    open_store, clock = backend
    store = await open_store()
    assert await store.create("a", "m", conversation_key="k", owner="alice")
    assert not await store.create("b", "m", conversation_key="k", owner="alice")
    assert await store.create("c", "m", conversation_key="k", owner="bob")
    assert (await store.by_key("k", "alice")).session_id == "a"  # type: ignore[union-attr]
    assert await store.create("d", "m", owner="alice")
    assert not await store.bind_key("d", "k", "alice")
    clock.now += TTL + 1  # "a" expires, and gives its id up
    assert await store.by_key("k", "alice") is None
    assert await store.create("e", "m", owner="alice")
    assert await store.bind_key("e", "k", "alice")
    assert (await store.by_key("k", "alice")).session_id == "e"  # type: ignore[union-attr]


async def test_only_a_clean_unnamed_session_is_matched_by_a_resend(backend: tuple[Opener, Clock]) -> None:
    open_store, _ = backend
    store = await open_store()
    await store.create("plain", "m", head_digest="h")
    await store.create("named", "m", head_digest="hn", conversation_key="k")
    await store.create("fork", "m", head_digest="hf", parent_id="plain")
    await store.create("bad", "m", head_digest="hb")
    await store.fail_turn(turn("bad"))
    assert (await store.find_head("h")).session_id == "plain"  # type: ignore[union-attr]
    for digest in ("hn", "hf", "hb"):
        assert await store.find_head(digest) is None
    bad = await store.get("bad")
    assert bad is not None and bad.diverged and bad.failed_turns == 1 and bad.usage.input_tokens == 3
    await store.create("parked", "m", head_digest="hp")
    await store.fail_turn(turn("parked", status="park_ended"), diverge=False)
    assert (await store.find_head("hp")).session_id == "parked"  # type: ignore[union-attr]


async def test_pages_by_most_recent_update_per_owner(backend: tuple[Opener, Clock]) -> None:
    open_store, clock = backend
    store = await open_store()
    for index in range(5):
        clock.now += 1
        await store.create(f"s{index}", "m", owner="alice" if index % 2 == 0 else "bob")
    page = await store.page(2, owner="alice")
    assert [r.session_id for r in page.records] == ["s4", "s2"] and page.has_more
    rest = await store.page(2, after="s2", owner="alice")
    assert [r.session_id for r in rest.records] == ["s0"] and not rest.has_more
    with pytest.raises(UnknownCursor):
        await store.page(2, after="s3", owner="alice")  # bob's
    assert [r.session_id for r in (await store.page(10)).records] == ["s4", "s3", "s2", "s1", "s0"]
    clock.now += TTL + 2.5
    assert (await store.page(10)).records == []
    assert len((await store.page(10, expired=True)).records) == 5
    assert await store.all_ids() == {f"s{i}": False for i in range(5)}


async def test_kept_outputs_deletes_and_sweeps(backend: tuple[Opener, Clock]) -> None:
    open_store, clock = backend
    store = await open_store()
    await store.create("s", "m", owner="alice")
    kept = turn("s", owner="alice", output={"result": {"text": "hi"}})
    await store.complete_turn(kept, "h")
    got = await store.get_turn(kept.turn_id, "alice")
    assert got is not None and got.output == {"result": {"text": "hi"}} and got.usage == Usage(3, 2)
    assert await store.get_turn(kept.turn_id, "bob") is None
    assert await store.forget_output(kept.turn_id, "alice")
    assert not await store.forget_output(kept.turn_id, "alice")
    assert await store.get_turn(kept.turn_id, "alice") is None
    await store.create("gone", "m")
    assert await store.delete("gone") and not await store.delete("gone")
    await store.create("old", "m")
    await store.complete_turn(turn("old", output={"x": 1}), "h")
    clock.now += TTL + 1
    await store.create("new", "m")
    assert await store.sweep() == 2  # "s" and "old"
    assert set(await store.all_ids()) == {"new"}
    (total,) = await store.ledger(LedgerQuery())
    assert total.turns == 2  # usage rows outlive their sessions


async def test_the_ledger_groups_and_follows_every_write_in_order(backend: tuple[Opener, Clock]) -> None:
    open_store, clock = backend
    ours, theirs = await open_store(), await open_store()
    rows = []
    for index, (store, owner) in enumerate([(ours, "a"), (theirs, "b"), (ours, "a"), (theirs, "a")]):
        session = f"s{index}"
        await store.create(session, "m", owner=owner)
        row = turn(session, Usage(10, 1, factory_credits=0.5), owner=owner, droid_model="custom:m-0",
                   standard_tokens=11.0 * (index + 1), cost_source="config", multiplier=1.0,
                   finished_at=clock.now + index * 86400)
        await (store.complete_turn(row, "h") if index != 2 else store.fail_turn(row))
        rows.append(row)
    by_key = {g.group[0]: g for g in await ours.ledger(LedgerQuery(by=("key",)))}
    assert by_key["a"].turns == 3 and by_key["a"].failed == 1 and by_key["b"].standard_tokens == 22.0
    assert by_key["a"].usage.factory_credits == 1.5
    days = await ours.ledger(LedgerQuery(by=("day", "model")))
    assert [g.group for g in days] == [("2027-01-15", "custom:m-0"), ("2027-01-16", "custom:m-0"),
                                       ("2027-01-17", "custom:m-0"), ("2027-01-18", "custom:m-0")]
    window = await ours.ledger(LedgerQuery(since=clock.now + 86400, until=clock.now + 3 * 86400, owner="a"))
    assert window[0].turns == 1
    buckets = await ours.ledger(LedgerQuery(by=("bucket",), bucket_s=86400.0))
    assert sum(g.turns for g in buckets) == 4
    entries = await theirs.ledger_entries(0, 0.0, 100)
    assert [e.standard_tokens for e in entries] == [11.0, 22.0, 33.0, 44.0]  # in write order
    assert [e.owner for e in entries] == ["a", "b", "a", "a"]
    later = await ours.ledger_entries(entries[1].seq, 0.0, 100)
    assert [e.standard_tokens for e in later] == [33.0, 44.0]
    assert await ours.ledger_entries(0, clock.now + 2 * 86400, 1) == [entries[2]]


async def test_two_nodes_racing_for_one_new_conversation_get_one_session(backend: tuple[Opener, Clock]) -> None:
    open_store, _ = backend
    stores = [await open_store() for _ in range(4)]
    for attempt in range(5):
        key, won = f"race-{attempt}", []

        async def claim(store: SessionStore, index: int) -> None:
            if await store.create(f"{key}-{index}", "m", conversation_key=key, owner="alice"):
                won.append(index)

        async with anyio.create_task_group() as tg:
            for index, store in enumerate(stores):
                tg.start_soon(claim, store, index)
        assert len(won) == 1
        assert (await stores[0].by_key(key, "alice")).session_id == f"{key}-{won[0]}"  # type: ignore[union-attr]
    # and racing writes to one session lose nothing
    await stores[0].create("shared", "m")
    async with anyio.create_task_group() as tg:
        for index in range(20):
            tg.start_soon(stores[index % 4].complete_turn, turn("shared", Usage(1, 1)), f"h{index}")
    shared = await stores[1].get("shared")
    assert shared is not None and shared.turns == 20 and shared.usage.input_tokens == 20
    assert (await stores[2].ledger(LedgerQuery()))[0].turns == 20


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


async def test_nodes_register_hold_sessions_and_keep_their_files(backend: tuple[Opener, Clock]) -> None:
    from droidpool.store.base import NodeRow

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

    await a.save_files("s1", [("f/s1.jsonl", 0, b"line 1\n")], [("f/s1.settings.json", b'{"v": 1}')])
    await a.save_files("s1", [("f/s1.jsonl", 7, b"line 2\n"), ("f/s1.jsonl", 0, b"line 1\n")],
                       [("f/s1.settings.json", b'{"v": 2}')])
    assert await b.load_files("s1") == {"f/s1.jsonl": b"line 1\nline 2\n", "f/s1.settings.json": b'{"v": 2}'}
    assert await b.load_files("s2") == {}
    await b.delete("s1")
    assert await a.load_files("s1") == {}


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
                    await anyio.sleep(0)
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
