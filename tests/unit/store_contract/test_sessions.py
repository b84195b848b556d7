"""``SessionRecords``: sessions and their turns, created, continued, matched, paged, kept, deleted, swept;
and raced for by several nodes."""

from __future__ import annotations

import anyio
import pytest

from droidpool.droid.protocol import Usage
from droidpool.store import SessionStore, UnknownCursor
from droidpool.store.base import LedgerQuery

from . import TTL, Clock, Opener, turn

pytestmark = pytest.mark.anyio


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


async def test_two_nodes_racing_for_one_new_conversation_get_one_session(backend: tuple[Opener, Clock]) -> None:
    open_store, _ = backend
    stores = [await open_store() for _ in range(4)]

    async def claim(store: SessionStore, index: int, key: str, won: list[int]) -> None:
        if await store.create(f"{key}-{index}", "m", conversation_key=key, owner="alice"):
            won.append(index)

    for attempt in range(5):
        key, won = f"race-{attempt}", []
        async with anyio.create_task_group() as tg:
            for index, store in enumerate(stores):
                tg.start_soon(claim, store, index, key, won)
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
