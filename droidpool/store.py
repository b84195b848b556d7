"""The durable session store: conversation → droid session, in SQLite (WAL), off the event loop."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread

from .protocol import Usage

T = TypeVar("T")

# Each entry upgrades the schema by one version; the index is the version it produces - 1.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE sessions (
        session_id TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        head_digest TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        turns INTEGER NOT NULL DEFAULT 0,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        cache_read_tokens INTEGER NOT NULL DEFAULT 0,
        cache_creation_tokens INTEGER NOT NULL DEFAULT 0,
        thinking_tokens INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX sessions_head ON sessions (head_digest);
    CREATE INDEX sessions_updated ON sessions (updated_at);
    """,
)


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    model: str
    head_digest: str | None
    created_at: float
    updated_at: float
    turns: int
    usage: Usage

    def public(self) -> dict[str, Any]:
        return {
            "id": self.session_id,
            "object": "droidpool.session",
            "model": self.model,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "turns": self.turns,
            "usage": {
                "input_tokens": self.usage.input_tokens,
                "output_tokens": self.usage.output_tokens,
                "cache_read_tokens": self.usage.cache_read_tokens,
                "cache_creation_tokens": self.usage.cache_creation_tokens,
                "thinking_tokens": self.usage.thinking_tokens,
            },
        }


_COLUMNS = (
    "session_id, model, head_digest, created_at, updated_at, turns, input_tokens, output_tokens, "
    "cache_read_tokens, cache_creation_tokens, thinking_tokens"
)


def _record(row: tuple[Any, ...]) -> SessionRecord:
    return SessionRecord(row[0], row[1], row[2], row[3], row[4], row[5], Usage(*row[6:11]))


class SessionStore:
    """One SQLite connection used from worker threads, one statement at a time."""

    def __init__(self, path: Path, ttl_s: float) -> None:
        self.path = path
        self.ttl_s = ttl_s
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<SessionStore {self.path}>"

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
        for index in range(version, len(MIGRATIONS)):
            db.executescript(f"BEGIN; {MIGRATIONS[index]} PRAGMA user_version = {index + 1}; COMMIT;")
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

    # --- operations --------------------------------------------------------------------------

    async def create(self, session_id: str, model: str) -> None:
        now = time.time()
        await self._run(
            lambda: self._conn().execute(
                "INSERT OR IGNORE INTO sessions (session_id, model, created_at, updated_at) VALUES (?, ?, ?, ?)",
                (session_id, model, now, now),
            )
        )

    async def get(self, session_id: str) -> SessionRecord | None:
        cutoff = time.time() - self.ttl_s
        row = await self._run(
            lambda: self._conn().execute(
                f"SELECT {_COLUMNS} FROM sessions WHERE session_id = ? AND updated_at >= ?",
                (session_id, cutoff),
            ).fetchone()
        )
        return _record(row) if row else None

    async def find_head(self, digest: str) -> SessionRecord | None:
        """The live session whose history, after its last turn, has this digest."""
        cutoff = time.time() - self.ttl_s
        row = await self._run(
            lambda: self._conn().execute(
                f"SELECT {_COLUMNS} FROM sessions WHERE head_digest = ? AND updated_at >= ? "
                "ORDER BY updated_at DESC LIMIT 1",
                (digest, cutoff),
            ).fetchone()
        )
        return _record(row) if row else None

    async def complete_turn(self, session_id: str, model: str, head_digest: str, usage: Usage) -> None:
        now = time.time()
        await self._run(
            lambda: self._conn().execute(
                "UPDATE sessions SET model = ?, head_digest = ?, updated_at = ?, turns = turns + 1, "
                "input_tokens = input_tokens + ?, output_tokens = output_tokens + ?, "
                "cache_read_tokens = cache_read_tokens + ?, cache_creation_tokens = cache_creation_tokens + ?, "
                "thinking_tokens = thinking_tokens + ? WHERE session_id = ?",
                (model, head_digest, now, usage.input_tokens, usage.output_tokens,
                 usage.cache_read_tokens, usage.cache_creation_tokens, usage.thinking_tokens, session_id),
            )
        )

    async def list(self, limit: int = 100) -> list[SessionRecord]:
        cutoff = time.time() - self.ttl_s
        rows = await self._run(
            lambda: self._conn().execute(
                f"SELECT {_COLUMNS} FROM sessions WHERE updated_at >= ? ORDER BY updated_at DESC LIMIT ?",
                (cutoff, limit),
            ).fetchall()
        )
        return [_record(r) for r in rows]

    async def delete(self, session_id: str) -> bool:
        cursor = await self._run(
            lambda: self._conn().execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
        )
        return cursor.rowcount > 0

    async def sweep(self) -> int:
        """Delete expired sessions; returns how many."""
        cutoff = time.time() - self.ttl_s
        cursor = await self._run(
            lambda: self._conn().execute("DELETE FROM sessions WHERE updated_at < ?", (cutoff,))
        )
        return cursor.rowcount
