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

from droidpool.droid.protocol import Usage

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
    # v2: client-chosen conversation ids (one session per id, whatever the model), forks, and
    # the turn bookkeeping that keeps a stateless resend off a session whose droid history holds
    # more than the client saw (a failed, interrupted or crashed turn).
    """
    ALTER TABLE sessions ADD COLUMN conversation_key TEXT;
    ALTER TABLE sessions ADD COLUMN parent_session_id TEXT;
    ALTER TABLE sessions ADD COLUMN in_flight INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sessions ADD COLUMN diverged INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sessions ADD COLUMN failed_turns INTEGER NOT NULL DEFAULT 0;
    CREATE UNIQUE INDEX sessions_conversation_key ON sessions (conversation_key)
        WHERE conversation_key IS NOT NULL;
    """,
    # v3: sessions belong to the API key that created them (its name; "" without auth);
    # conversation ids are unique per owner.
    """
    ALTER TABLE sessions ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    DROP INDEX sessions_conversation_key;
    CREATE UNIQUE INDEX sessions_owner_conversation_key ON sessions (owner, conversation_key)
        WHERE conversation_key IS NOT NULL;
    CREATE INDEX sessions_owner_updated ON sessions (owner, updated_at);
    """,
)

MAX_LIST_LIMIT = 1000


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    model: str
    head_digest: str | None
    created_at: float
    updated_at: float
    turns: int
    usage: Usage
    conversation_key: str | None = None
    parent_id: str | None = None
    in_flight: bool = False  # a turn started and has not been recorded (yet, or ever: a crash)
    diverged: bool = False  # droid's history holds a turn the client never saw completed
    failed_turns: int = 0
    owner: str = ""  # the API key's name that created it; "" without authentication

    @property
    def matchable(self) -> bool:
        """May a stateless resend continue this session? Only if its droid history is exactly
        the client-visible one, nobody named it, and it is not an untouched fork."""
        return (
            self.head_digest is not None
            and not self.in_flight
            and not self.diverged
            and self.conversation_key is None
            and not (self.parent_id is not None and self.turns == 0)
        )

    def public(self, ttl_s: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.session_id,
            "object": "droidpool.session",
            "model": self.model,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "turns": self.turns,
            "failed_turns": self.failed_turns,
            "conversation_id": self.conversation_key,
            "parent_id": self.parent_id,
            "in_flight": self.in_flight,
            "diverged": self.diverged,
            "usage": {
                "input_tokens": self.usage.input_tokens,
                "output_tokens": self.usage.output_tokens,
                "cache_read_tokens": self.usage.cache_read_tokens,
                "cache_creation_tokens": self.usage.cache_creation_tokens,
                "thinking_tokens": self.usage.thinking_tokens,
            },
        }
        if ttl_s is not None:
            body["expires_at"] = self.updated_at + ttl_s
        return body


_COLUMNS = (
    "session_id, model, head_digest, created_at, updated_at, turns, input_tokens, output_tokens, "
    "cache_read_tokens, cache_creation_tokens, thinking_tokens, conversation_key, "
    "parent_session_id, in_flight, diverged, failed_turns, owner"
)
_MATCHABLE = (
    "in_flight = 0 AND diverged = 0 AND conversation_key IS NULL "
    "AND NOT (parent_session_id IS NOT NULL AND turns = 0)"
)
_ADD_USAGE = (
    "input_tokens = input_tokens + ?, output_tokens = output_tokens + ?, "
    "cache_read_tokens = cache_read_tokens + ?, cache_creation_tokens = cache_creation_tokens + ?, "
    "thinking_tokens = thinking_tokens + ?"
)


def _record(row: tuple[Any, ...]) -> SessionRecord:
    return SessionRecord(
        row[0], row[1], row[2], row[3], row[4], row[5], Usage(*row[6:11]),
        row[11], row[12], bool(row[13]), bool(row[14]), row[15], row[16],
    )


def _usage_params(usage: Usage) -> tuple[int, int, int, int, int]:
    return (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens,
            usage.cache_creation_tokens, usage.thinking_tokens)


@dataclass(frozen=True)
class Page:
    """One page of the session list, newest update first."""

    records: list[SessionRecord]
    has_more: bool


class UnknownCursor(LookupError):
    """A list's ``after`` names no session."""


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

    def _cutoff(self) -> float:
        return time.time() - self.ttl_s

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

    def _release_expired_key(self, db: sqlite3.Connection, key: str, owner: str) -> None:
        """An expired session gives up its conversation id (it is invisible anyway)."""
        db.execute(
            "UPDATE sessions SET conversation_key = NULL WHERE owner = ? AND conversation_key = ? "
            "AND updated_at < ?",
            (owner, key, self._cutoff()),
        )

    # --- reads -------------------------------------------------------------------------------

    async def get(self, session_id: str) -> SessionRecord | None:
        """The live (unexpired) session with this id."""
        cutoff = self._cutoff()
        row = await self._run(
            lambda: self._conn().execute(
                f"SELECT {_COLUMNS} FROM sessions WHERE session_id = ? AND updated_at >= ?",
                (session_id, cutoff),
            ).fetchone()
        )
        return _record(row) if row else None

    async def by_key(self, key: str, owner: str = "") -> SessionRecord | None:
        """The live session a client (``owner``) named with this conversation id."""
        cutoff = self._cutoff()
        row = await self._run(
            lambda: self._conn().execute(
                f"SELECT {_COLUMNS} FROM sessions WHERE owner = ? AND conversation_key = ? AND updated_at >= ?",
                (owner, key, cutoff),
            ).fetchone()
        )
        return _record(row) if row else None

    async def find_head(self, digest: str) -> SessionRecord | None:
        """The live session a stateless resend of history ``digest`` may continue."""
        cutoff = self._cutoff()
        row = await self._run(
            lambda: self._conn().execute(
                f"SELECT {_COLUMNS} FROM sessions WHERE head_digest = ? AND updated_at >= ? "
                f"AND {_MATCHABLE} ORDER BY updated_at DESC LIMIT 1",
                (digest, cutoff),
            ).fetchone()
        )
        return _record(row) if row else None

    async def list(self, limit: int = 100) -> list[SessionRecord]:
        """The ``limit`` most recently updated live sessions."""
        return (await self.page(limit)).records

    async def page(
        self, limit: int = 100, after: str | None = None, *, expired: bool = False, owner: str | None = None
    ) -> Page:
        """Sessions by most recent update (then id), ``limit`` at a time, from after ``after``.

        A session updated between two pages moves to the front: paging may then miss or
        repeat it. Raises UnknownCursor if ``after`` names no session.
        """
        limit = max(1, min(limit, MAX_LIST_LIMIT))
        cutoff = -1.0 if expired else self._cutoff()

        def query() -> list[Any]:
            db = self._conn()
            where = "updated_at >= ?"
            params: list[Any] = [cutoff]
            if owner is not None:
                where += " AND owner = ?"
                params.append(owner)
            if after is not None:
                anchor = db.execute(
                    "SELECT updated_at, owner FROM sessions WHERE session_id = ?", (after,)
                ).fetchone()
                if anchor is None or (owner is not None and anchor[1] != owner):  # not theirs: unknown
                    raise UnknownCursor(after)
                where += " AND (updated_at < ? OR (updated_at = ? AND session_id < ?))"
                params += [anchor[0], anchor[0], after]
            return db.execute(
                f"SELECT {_COLUMNS} FROM sessions WHERE {where} "
                "ORDER BY updated_at DESC, session_id DESC LIMIT ?",
                (*params, limit + 1),
            ).fetchall()

        rows = await self._run(query)
        return Page([_record(r) for r in rows[:limit]], len(rows) > limit)

    async def all_ids(self) -> dict[str, bool]:
        """Every stored session id, expired or not → whether it is still live."""
        cutoff = self._cutoff()
        rows = await self._run(
            lambda: self._conn().execute("SELECT session_id, updated_at >= ? FROM sessions", (cutoff,)).fetchall()
        )
        return {r[0]: bool(r[1]) for r in rows}

    # --- writes ------------------------------------------------------------------------------

    async def create(
        self,
        session_id: str,
        model: str,
        *,
        conversation_key: str | None = None,
        parent_id: str | None = None,
        head_digest: str | None = None,
        in_flight: bool = False,
        diverged: bool = False,
        owner: str = "",
    ) -> bool:
        """Record a new session; False if ``conversation_key`` already names a live session."""
        now = time.time()

        def insert(db: sqlite3.Connection) -> bool:
            if conversation_key is not None:
                self._release_expired_key(db, conversation_key, owner)
            try:
                db.execute(
                    "INSERT INTO sessions (session_id, model, created_at, updated_at, "
                    "conversation_key, parent_session_id, head_digest, in_flight, diverged, owner) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (session_id) DO NOTHING",
                    (session_id, model, now, now, conversation_key, parent_id, head_digest,
                     int(in_flight), int(diverged), owner),
                )
            except sqlite3.IntegrityError:
                return False
            return True

        return await self._run(self._transaction, insert)

    async def bind_key(self, session_id: str, key: str, owner: str = "") -> bool:
        """Name a session with a conversation id; False if the id names another live session."""

        def bind(db: sqlite3.Connection) -> bool:
            self._release_expired_key(db, key, owner)
            try:
                db.execute("UPDATE sessions SET conversation_key = ? WHERE session_id = ?", (key, session_id))
            except sqlite3.IntegrityError:
                return False
            return True

        return await self._run(self._transaction, bind)

    async def begin_turn(self, session_id: str) -> None:
        """Durably note a turn is about to reach droid: if droidpool dies before the turn is
        recorded, the session stays off stateless matching (droid may hold the message)."""
        await self._run(
            lambda: self._conn().execute(
                "UPDATE sessions SET diverged = diverged | in_flight, in_flight = 1 WHERE session_id = ?",
                (session_id,),
            )
        )

    async def complete_turn(self, session_id: str, model: str, head_digest: str, usage: Usage) -> None:
        now = time.time()
        await self._run(
            lambda: self._conn().execute(
                f"UPDATE sessions SET model = ?, head_digest = ?, updated_at = ?, turns = turns + 1, "
                f"in_flight = 0, {_ADD_USAGE} WHERE session_id = ?",
                (model, head_digest, now, *_usage_params(usage), session_id),
            )
        )

    async def fail_turn(self, session_id: str, usage: Usage) -> None:
        """A turn that reached droid but did not complete: count its tokens (droid spent them),
        keep the head, and keep stateless resends off this session from now on."""
        now = time.time()
        await self._run(
            lambda: self._conn().execute(
                f"UPDATE sessions SET updated_at = ?, failed_turns = failed_turns + 1, in_flight = 0, "
                f"diverged = 1, {_ADD_USAGE} WHERE session_id = ?",
                (now, *_usage_params(usage), session_id),
            )
        )

    async def delete(self, session_id: str) -> bool:
        cursor = await self._run(
            lambda: self._conn().execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
        )
        return cursor.rowcount > 0

    async def sweep(self) -> int:
        """Delete expired sessions; returns how many."""
        cutoff = self._cutoff()
        cursor = await self._run(
            lambda: self._conn().execute("DELETE FROM sessions WHERE updated_at < ?", (cutoff,))
        )
        return cursor.rowcount
