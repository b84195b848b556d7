"""The session store: schema, durability settings, expiry."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from droidpool.droid.protocol import Usage
from droidpool.store import MIGRATIONS, SqliteStore
from tests.unit.harness import turn_row

pytestmark = pytest.mark.anyio


async def test_create_complete_find_and_usage_accumulate(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db", ttl_s=3600)
    await store.open()
    await store.create("s1", "m")
    assert (await store.get("s1")).turns == 0  # type: ignore[union-attr]
    await store.complete_turn(turn_row("s1", "m2", Usage(3, 2, 1, 0, 4)), "head-1")
    await store.complete_turn(turn_row("s1", "m2", Usage(1, 1, 0, 0, 0)), "head-2")
    record = await store.get("s1")
    assert record is not None and record.turns == 2 and record.model == "m2"
    assert record.usage == Usage(4, 3, 1, 0, 4)
    assert (await store.find_head("head-2")) == record
    assert await store.find_head("head-1") is None
    await store.close()
    # Durable: a new store on the same file sees it, with WAL and FULL sync on.
    reopened = SqliteStore(tmp_path / "s.db", ttl_s=3600)
    await reopened.open()
    assert (await reopened.get("s1")) == record
    db = reopened._conn()
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    await reopened.close()


async def test_expired_sessions_are_invisible_and_swept(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db", ttl_s=60)
    await store.open()
    await store.create("old", "m")
    await store.create("new", "m")
    store._conn().execute("UPDATE sessions SET updated_at = ? WHERE session_id = 'old'", (time.time() - 120,))
    assert await store.get("old") is None
    assert [r.session_id for r in await store.list()] == ["new"]
    assert await store.sweep() == 1
    assert await store.delete("new") and not await store.delete("new")
    await store.close()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    sqlite3.connect(path).execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(RuntimeError, match="newer"):
        await SqliteStore(path, 60).open()


async def test_conversation_ids_and_listings_are_per_owner(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db", ttl_s=3600)
    await store.open()
    assert await store.create("a1", "m", conversation_key="chat", owner="alice")
    assert await store.create("b1", "m", conversation_key="chat", owner="bob")  # same id, other owner
    assert not await store.create("a2", "m", conversation_key="chat", owner="alice")
    assert (await store.by_key("chat", "alice")).session_id == "a1"  # type: ignore[union-attr]
    assert (await store.by_key("chat", "bob")).session_id == "b1"  # type: ignore[union-attr]
    assert await store.by_key("chat") is None
    assert [r.session_id for r in (await store.page(owner="alice")).records] == ["a1"]
    assert {r.session_id for r in (await store.page()).records} == {"a1", "b1"}
    await store.close()
