"""The SQLite store's one connection: opened onto the current schema, and used from worker threads
one statement (or transaction) at a time."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread

from .schema import MIGRATIONS

T = TypeVar("T")


class SqliteDatabase:
    """The connection every concern's statements run on (each concern is a mixin over this)."""

    def __init__(self, path: Path, ttl_s: float, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.ttl_s = ttl_s
        self.clock = clock
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    async def open(self) -> None:
        await self._run(self._open)

    async def close(self) -> None:
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=5000")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            db.close()
            raise RuntimeError(
                f"{self.path}: schema version {version} is newer than this droidpool understands"
            )
        while (version := db.execute("PRAGMA user_version").fetchone()[0]) < len(MIGRATIONS):
            try:
                db.executescript(
                    f"BEGIN IMMEDIATE; {MIGRATIONS[version]} PRAGMA user_version = {version + 1}; COMMIT;"
                )
            except sqlite3.OperationalError:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                # Another process (the daemon, `droidpool sessions`) migrated it meanwhile: fine.
                if db.execute("PRAGMA user_version").fetchone()[0] == version:
                    db.close()
                    raise
        self._db = db

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        def locked() -> T:
            with self._lock:
                return fn(*args)

        return await anyio.to_thread.run_sync(locked)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("session store is not open")
        return self._db

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result
