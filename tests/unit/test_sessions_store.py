"""The session store's v2 schema: migration in place, conversation ids, turn bookkeeping, paging."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from droidpool.droid.protocol import Usage
from droidpool.store import MIGRATIONS, SqliteStore, UnknownCursor
from tests.unit.harness import turn_row

pytestmark = pytest.mark.anyio


async def opened(path: Path, ttl_s: float = 3600) -> SqliteStore:
    store = SqliteStore(path, ttl_s)
    await store.open()
    return store


async def test_a_v1_database_is_upgraded_in_place_and_keeps_every_mapping(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(f"BEGIN; {MIGRATIONS[0]} PRAGMA user_version = 1; COMMIT;")
    now = time.time()
    db.execute(
        "INSERT INTO sessions (session_id, model, head_digest, created_at, updated_at, turns, input_tokens) "
        "VALUES ('old', 'm', 'head-old', ?, ?, 3, 42)", (now, now),
    )
    db.close()
    store = await opened(path)
    record = await store.get("old")
    assert record is not None
    assert (record.head_digest, record.turns, record.usage.input_tokens) == ("head-old", 3, 42)
    assert record.conversation_key is None and not record.diverged and not record.in_flight
    assert await store.find_head("head-old") == record  # a v1 session stays resumable statelessly
    assert store._conn().execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 7
    assert record.owner == ""  # v1 and v2 sessions belong to the unauthenticated owner
    await store.close()
    again = await opened(path)  # opening an up-to-date file changes nothing
    assert await again.get("old") == record
    await again.close()


async def test_a_conversation_id_names_one_live_session(tmp_path: Path) -> None:
    store = await opened(tmp_path / "s.db", ttl_s=60)
    assert await store.create("s1", "m", conversation_key="k")
    assert not await store.create("s2", "m", conversation_key="k")  # the id is taken
    assert await store.get("s2") is None  # and nothing half-made stays behind
    assert (await store.by_key("k")).session_id == "s1"  # type: ignore[union-attr]
    await store.create("s3", "m")
    assert not await store.bind_key("s3", "k")
    # Once s1 expires, the id is free again: for a new session or an existing one.
    store._conn().execute("UPDATE sessions SET updated_at = ? WHERE session_id = 's1'", (time.time() - 120,))
    assert await store.by_key("k") is None
    assert await store.bind_key("s3", "k")
    assert (await store.by_key("k")).session_id == "s3"  # type: ignore[union-attr]
    await store.close()


async def test_only_a_clean_unnamed_session_is_matched_by_a_resend(tmp_path: Path) -> None:
    store = await opened(tmp_path / "s.db")
    await store.create("s", "m")
    await store.complete_turn(turn_row("s", "m", Usage(1, 1, 0, 0, 0)), "h1")
    assert (await store.find_head("h1")).session_id == "s"  # type: ignore[union-attr]
    # A turn is running (or droidpool died during one): droid may hold a message the head lacks.
    await store.begin_turn("s")
    assert await store.find_head("h1") is None
    await store.complete_turn(turn_row("s", "m", Usage(1, 1, 0, 0, 0)), "h2")
    assert (await store.find_head("h2")).session_id == "s"  # type: ignore[union-attr]
    # A failed turn keeps the head, adds its tokens, and takes the session off matching for good.
    await store.begin_turn("s")
    await store.fail_turn(turn_row("s", "m", Usage(5, 0, 0, 0, 0)))
    record = await store.get("s")
    assert record is not None and record.head_digest == "h2" and record.diverged and record.failed_turns == 1
    assert record.usage.input_tokens == 7 and record.turns == 2
    assert await store.find_head("h2") is None
    await store.complete_turn(turn_row("s", "m", Usage()), "h3")
    assert await store.find_head("h3") is None
    # A crash mid-turn (begin without end) is remembered at the next turn's start.
    await store.create("c", "m")
    await store.complete_turn(turn_row("c", "m", Usage()), "c1")
    await store.begin_turn("c")
    await store.begin_turn("c")
    await store.complete_turn(turn_row("c", "m", Usage()), "c2")
    assert (await store.get("c")).diverged  # type: ignore[union-attr]
    # Named sessions and untouched forks are for their owners only.
    await store.create("n", "m", conversation_key="k")
    await store.complete_turn(turn_row("n", "m", Usage()), "n1")
    assert await store.find_head("n1") is None
    await store.create("f", "m", parent_id="x", head_digest="shared")
    assert await store.find_head("shared") is None
    await store.complete_turn(turn_row("f", "m", Usage()), "f1")
    assert (await store.find_head("f1")).session_id == "f"  # type: ignore[union-attr]
    await store.close()


async def test_pages_follow_the_most_recent_update(tmp_path: Path) -> None:
    store = await opened(tmp_path / "s.db", ttl_s=60)
    for i in range(7):
        await store.create(f"s{i}", "m")
    db = store._conn()
    now = time.time()
    for i in range(7):
        db.execute("UPDATE sessions SET updated_at = ? WHERE session_id = ?", (now - i, f"s{i}"))
    db.execute("UPDATE sessions SET updated_at = ? WHERE session_id = 's2'", (now - 1,))  # a tie with s1
    db.execute("UPDATE sessions SET updated_at = ? WHERE session_id = 's6'", (now - 600,))  # expired
    seen: list[str] = []
    after = None
    while True:
        page = await store.page(2, after)
        seen += [r.session_id for r in page.records]
        if not page.has_more:
            break
        after = page.records[-1].session_id
    assert seen == ["s0", "s2", "s1", "s3", "s4", "s5"]
    assert [r.session_id for r in (await store.page(100, expired=True)).records][-1] == "s6"
    with pytest.raises(UnknownCursor):
        await store.page(2, "nope")
    assert await store.all_ids() == {**{f"s{i}": True for i in range(6)}, "s6": False}
    await store.close()


async def test_the_daemon_and_the_cli_can_open_one_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    first = await opened(path)
    second = await opened(path)
    await first.create("s", "m")
    assert await second.get("s") is not None
    assert await second.delete("s")
    assert await first.get("s") is None
    await first.close()
    await second.close()


async def test_a_page_cursor_must_be_the_owners_own_session(tmp_path: Path) -> None:
    store = await opened(tmp_path / "s.db")
    await store.create("mine", "m", owner="alice")
    await store.create("theirs", "m", owner="bob")
    assert [r.session_id for r in (await store.page(10, owner="alice")).records] == ["mine"]
    assert (await store.page(10, "mine", owner="alice")).records == []
    with pytest.raises(UnknownCursor):
        await store.page(10, "theirs", owner="alice")
    await store.close()
