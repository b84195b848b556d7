"""The ``backend`` fixture: every test here runs once on SQLite and once on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from droidpool.store import SessionStore, SqliteStore

from . import TTL, Clock, Opener


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
