"""The embedded store: sessions and turns in SQLite (WAL, synchronous=FULL), off the event loop."""

from __future__ import annotations

import builtins
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
import orjson

from .base import (
    MAX_LIST_LIMIT,
    LedgerEntry,
    LedgerGroup,
    LedgerQuery,
    NodeRow,
    Page,
    SessionRecord,
    TurnRow,
    UnknownCursor,
    assemble,
)
from .rows import (
    KEPT_TURN_COLUMNS,
    LEDGER_SUMS,
    SESSION_COLUMNS,
    kept_turn,
    ledger_group,
    session_record,
    usage_counts,
)

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
    # v4: one row per turn that reached droid (completed or failed), with the dialect that asked
    # and, when the client asked to keep it (Responses' store), its output; sessions point at
    # their latest completed turn (Responses' previous_response_id continues from there).
    """
    ALTER TABLE sessions ADD COLUMN last_turn_id TEXT;
    CREATE TABLE turns (
        turn_id TEXT PRIMARY KEY,
        session_id TEXT NOT NULL,
        owner TEXT NOT NULL DEFAULT '',
        model TEXT NOT NULL,
        dialect TEXT NOT NULL,
        status TEXT NOT NULL,
        started_at REAL NOT NULL,
        finished_at REAL NOT NULL,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        cache_read_tokens INTEGER NOT NULL DEFAULT 0,
        cache_creation_tokens INTEGER NOT NULL DEFAULT 0,
        thinking_tokens INTEGER NOT NULL DEFAULT 0,
        output BLOB
    );
    CREATE INDEX turns_session ON turns (session_id);
    CREATE INDEX turns_owner_finished ON turns (owner, finished_at);
    """,
    # v5: the turns table becomes the usage ledger: the droid model that ran each turn, its
    # conversation id, droid's own credit estimate, and the cost (multiplier, standard tokens,
    # where the price came from, USD). Rows from before have cost_source 'unrecorded'.
    """
    ALTER TABLE turns ADD COLUMN droid_model TEXT NOT NULL DEFAULT '';
    ALTER TABLE turns ADD COLUMN conversation_key TEXT;
    ALTER TABLE turns ADD COLUMN factory_credits REAL NOT NULL DEFAULT 0;
    ALTER TABLE turns ADD COLUMN multiplier REAL;
    ALTER TABLE turns ADD COLUMN standard_tokens REAL NOT NULL DEFAULT 0;
    ALTER TABLE turns ADD COLUMN cost_source TEXT NOT NULL DEFAULT 'unrecorded';
    ALTER TABLE turns ADD COLUMN usd REAL;
    CREATE INDEX turns_finished ON turns (finished_at);
    """,
    # v6: several nodes: the registry, the node holding each session's live worker, and droid's
    # session files (appended chunks) so that another node can take a session over.
    """
    ALTER TABLE sessions ADD COLUMN node_id TEXT;
    CREATE INDEX sessions_node ON sessions (node_id);
    CREATE TABLE nodes (
        node_id TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        capacity INTEGER NOT NULL,
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL,
        state TEXT NOT NULL
    );
    CREATE TABLE session_files (
        session_id TEXT NOT NULL,
        name TEXT NOT NULL,
        start_byte INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (session_id, name, start_byte)
    );
    """,
    # v7: what each turn sent droid besides text: images and documents, counted and in bytes.
    """
    ALTER TABLE turns ADD COLUMN attachments INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE turns ADD COLUMN attachment_bytes INTEGER NOT NULL DEFAULT 0;
    """,
)

# The ledger's group-by dimensions, as SQL over the turns table (a fixed list: nothing a caller
# passes is ever spliced into a statement).
_DIMENSION_SQL: dict[str, str] = {
    "key": "owner",
    "model": "CASE WHEN droid_model != '' THEN droid_model ELSE model END",
    "session": "session_id",
    "day": "date(finished_at, 'unixepoch')",
    "dialect": "dialect",
    "status": "status",
    "bucket": "CAST(CAST(finished_at / :bucket AS INTEGER) AS TEXT)",
}

_MATCHABLE = (
    "in_flight = 0 AND diverged = 0 AND conversation_key IS NULL "
    "AND NOT (parent_session_id IS NOT NULL AND turns = 0)"
)
_ADD_USAGE = (
    "input_tokens = input_tokens + ?, output_tokens = output_tokens + ?, "
    "cache_read_tokens = cache_read_tokens + ?, cache_creation_tokens = cache_creation_tokens + ?, "
    "thinking_tokens = thinking_tokens + ?"
)


class SqliteStore:
    """One SQLite connection used from worker threads, one statement at a time."""

    def __init__(self, path: Path, ttl_s: float, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.ttl_s = ttl_s
        self.clock = clock
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<SqliteStore {self.path}>"

    async def open(self) -> None:
        await self._run(self._open)

    def on_lock_loss(self, callback: Callable[[], None]) -> None:
        """Never: the process's own locks cannot be lost."""

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        """One node per SQLite file: the process's own locks are all it takes."""
        yield

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
        return self.clock() - self.ttl_s

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
                f"SELECT {SESSION_COLUMNS} FROM sessions WHERE session_id = ? AND updated_at >= ?",
                (session_id, cutoff),
            ).fetchone()
        )
        return session_record(row) if row else None

    async def by_key(self, key: str, owner: str = "") -> SessionRecord | None:
        """The live session a client (``owner``) named with this conversation id."""
        cutoff = self._cutoff()
        row = await self._run(
            lambda: self._conn().execute(
                f"SELECT {SESSION_COLUMNS} FROM sessions WHERE owner = ? AND conversation_key = ? AND updated_at >= ?",
                (owner, key, cutoff),
            ).fetchone()
        )
        return session_record(row) if row else None

    async def find_head(self, digest: str) -> SessionRecord | None:
        """The live session a stateless resend of history ``digest`` may continue."""
        cutoff = self._cutoff()
        row = await self._run(
            lambda: self._conn().execute(
                f"SELECT {SESSION_COLUMNS} FROM sessions WHERE head_digest = ? AND updated_at >= ? "
                f"AND {_MATCHABLE} ORDER BY updated_at DESC LIMIT 1",
                (digest, cutoff),
            ).fetchone()
        )
        return session_record(row) if row else None

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
                f"SELECT {SESSION_COLUMNS} FROM sessions WHERE {where} "
                "ORDER BY updated_at DESC, session_id DESC LIMIT ?",
                (*params, limit + 1),
            ).fetchall()

        rows = await self._run(query)
        return Page([session_record(r) for r in rows[:limit]], len(rows) > limit)

    async def all_ids(self) -> dict[str, bool]:
        """Every stored session id, expired or not → whether it is still live."""
        cutoff = self._cutoff()
        rows = await self._run(
            lambda: self._conn().execute("SELECT session_id, updated_at >= ? FROM sessions", (cutoff,)).fetchall()
        )
        return {r[0]: bool(r[1]) for r in rows}

    async def interrupted(self, node_id: str | None = None) -> builtins.list[str]:
        """Sessions with a turn that reached droid and was never recorded (droidpool died in it)."""
        rows = await self._run(lambda: self._conn().execute(
            "SELECT session_id FROM sessions WHERE in_flight = 1 AND (node_id IS NULL OR node_id = ?)",
            (node_id,)).fetchall())
        return [r[0] for r in rows]

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
        now = self.clock()

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

    async def recovered(self, session_id: str) -> None:
        """droid's files of an interrupted session hold no more than its recorded turns again."""
        await self._run(lambda: self._conn().execute(
            "UPDATE sessions SET in_flight = 0 WHERE session_id = ?", (session_id,)))

    async def complete_turn(self, turn: TurnRow, head_digest: str) -> None:
        """Record a completed turn and move the session's head, in one transaction."""
        now = self.clock()

        def complete(db: sqlite3.Connection) -> None:
            db.execute(
                f"UPDATE sessions SET model = ?, head_digest = ?, updated_at = ?, turns = turns + 1, "
                f"in_flight = 0, last_turn_id = ?, {_ADD_USAGE} WHERE session_id = ?",
                (turn.model, head_digest, now, turn.turn_id, *usage_counts(turn.usage), turn.session_id),
            )
            self._insert_turn(db, turn, "completed", now)

        await self._run(self._transaction, complete)

    async def fail_turn(self, turn: TurnRow, *, diverge: bool = True) -> None:
        """A turn that reached droid but did not complete: count its tokens (droid spent them),
        keep the head, and (``diverge``) keep stateless resends off this session from now on."""
        now = self.clock()

        def fail(db: sqlite3.Connection) -> None:
            db.execute(
                f"UPDATE sessions SET updated_at = ?, failed_turns = failed_turns + 1, in_flight = 0, "
                f"diverged = diverged | ?, {_ADD_USAGE} WHERE session_id = ?",
                (now, int(diverge), *usage_counts(turn.usage), turn.session_id),
            )
            self._insert_turn(db, turn, turn.status if turn.status != "completed" else "failed", now)

        await self._run(self._transaction, fail)

    @staticmethod
    def _insert_turn(db: sqlite3.Connection, turn: TurnRow, status: str, now: float) -> None:
        """The turn's ledger row; a turn id already recorded is never counted again."""
        output = orjson.dumps(dict(turn.output)) if turn.output is not None else None
        db.execute(
            "INSERT INTO turns (turn_id, session_id, owner, model, dialect, status, started_at, finished_at, "
            "input_tokens, output_tokens, cache_read_tokens, cache_creation_tokens, thinking_tokens, output, "
            "droid_model, conversation_key, factory_credits, multiplier, standard_tokens, cost_source, usd, "
            "attachments, attachment_bytes) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (turn_id) DO NOTHING",
            (turn.turn_id, turn.session_id, turn.owner, turn.model, turn.dialect, status, turn.started_at,
             turn.finished_at if turn.finished_at is not None else now, *usage_counts(turn.usage), output,
             turn.droid_model, turn.conversation_key,
             turn.usage.factory_credits, turn.multiplier, turn.standard_tokens, turn.cost_source, turn.usd,
             turn.attachments, turn.attachment_bytes),
        )

    async def ledger_entries(self, after: int, since: float, limit: int) -> builtins.list[LedgerEntry]:
        """Rows written after ``after`` (their rowid, which grows with each insert under the write
        lock) that finished at ``since`` or later, oldest write first, at most ``limit``."""
        rows = await self._run(lambda: self._conn().execute(
            "SELECT rowid, finished_at, owner, standard_tokens, factory_credits FROM turns "
            "WHERE rowid > ? AND finished_at >= ? ORDER BY rowid LIMIT ?", (after, since, limit)).fetchall())
        return [LedgerEntry(*r) for r in rows]

    async def ledger(self, query: LedgerQuery) -> builtins.list[LedgerGroup]:
        """The turns finished in [since, until), summed per group of ``query.by``."""
        if "bucket" in query.by and query.bucket_s <= 0:
            raise ValueError("grouping by bucket needs bucket_s > 0")
        dims = [_DIMENSION_SQL[d] for d in query.by]
        where = "finished_at >= :since AND finished_at < :until"
        params: dict[str, Any] = {"since": query.since, "until": min(query.until, 1e18), "bucket": query.bucket_s}
        if query.owner is not None:
            where += " AND owner = :owner"
            params["owner"] = query.owner
        select = ", ".join([*dims, *LEDGER_SUMS])
        ordinals = ", ".join(str(i + 1) for i in range(len(dims)))
        group = f" GROUP BY {ordinals} ORDER BY {ordinals}" if dims else ""
        rows = await self._run(
            lambda: self._conn().execute(f"SELECT {select} FROM turns WHERE {where}{group}", params).fetchall())
        return [ledger_group(r, len(dims)) for r in rows if r[len(dims)]]

    async def get_turn(self, turn_id: str, owner: str) -> TurnRow | None:
        """A turn whose output was kept, if it is ``owner``'s."""
        row = await self._run(
            lambda: self._conn().execute(
                f"SELECT {KEPT_TURN_COLUMNS} FROM turns WHERE turn_id = ? AND owner = ? AND output IS NOT NULL",
                (turn_id, owner),
            ).fetchone()
        )
        return kept_turn(row) if row is not None else None

    async def forget_output(self, turn_id: str, owner: str) -> bool:
        """Drop a kept output (the turn's usage stays); False if there was none of ``owner``'s."""
        cursor = await self._run(
            lambda: self._conn().execute(
                "UPDATE turns SET output = NULL WHERE turn_id = ? AND owner = ? AND output IS NOT NULL",
                (turn_id, owner),
            )
        )
        return bool(cursor.rowcount > 0)

    async def delete(self, session_id: str) -> bool:
        """Forget a session and the outputs kept of its turns (their usage rows stay)."""

        def delete(db: sqlite3.Connection) -> bool:
            gone = db.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,)).rowcount > 0
            db.execute("DELETE FROM session_files WHERE session_id = ?", (session_id,))
            db.execute("UPDATE turns SET output = NULL WHERE session_id = ? AND output IS NOT NULL", (session_id,))
            return bool(gone)

        return await self._run(self._transaction, delete)

    async def sweep(self) -> int:
        """Delete expired sessions, and drop the outputs kept of turns as old; returns how many
        sessions went."""
        cutoff = self._cutoff()

        def sweep(db: sqlite3.Connection) -> int:
            swept = db.execute("DELETE FROM sessions WHERE updated_at < ?", (cutoff,)).rowcount
            if swept:
                db.execute("DELETE FROM session_files WHERE session_id NOT IN (SELECT session_id FROM sessions)")
            db.execute("UPDATE turns SET output = NULL WHERE finished_at < ? AND output IS NOT NULL", (cutoff,))
            return int(swept)

        return await self._run(self._transaction, sweep)

    # --- several nodes ------------------------------------------------------------------------

    async def heartbeat(self, node: NodeRow) -> None:
        await self._run(lambda: self._conn().execute(
            "INSERT INTO nodes (node_id, url, capacity, started_at, heartbeat_at, state) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (node_id) DO UPDATE SET url = excluded.url, capacity = excluded.capacity, "
            "heartbeat_at = excluded.heartbeat_at, state = excluded.state",
            (node.node_id, node.url, node.capacity, node.started_at, node.heartbeat_at, node.state)))

    async def nodes(self, sessions: bool = False) -> builtins.list[NodeRow]:
        """The registry; with ``sessions``, how many sessions each node holds (a count per node)."""
        count = "(SELECT COUNT(*) FROM sessions s WHERE s.node_id = n.node_id)" if sessions else "0"
        rows = await self._run(lambda: self._conn().execute(
            "SELECT n.node_id, n.url, n.capacity, n.started_at, n.heartbeat_at, n.state, "
            f"{count} FROM nodes n ORDER BY n.node_id").fetchall())
        return [NodeRow(*r) for r in rows]

    async def remove_node(self, node_id: str) -> None:
        await self._run(lambda: self._conn().execute("DELETE FROM nodes WHERE node_id = ?", (node_id,)))

    async def claim(self, session_id: str, node_id: str | None) -> None:
        await self._run(lambda: self._conn().execute(
            "UPDATE sessions SET node_id = ? WHERE session_id = ?", (node_id, session_id)))

    async def release_node(self, node_id: str) -> int:
        cursor = await self._run(lambda: self._conn().execute(
            "UPDATE sessions SET node_id = NULL WHERE node_id = ?", (node_id,)))
        return int(cursor.rowcount)

    async def save_files(self, session_id: str, appends: builtins.list[tuple[str, int, bytes]],
                         replaces: builtins.list[tuple[str, bytes]]) -> None:
        """Append chunks of droid's growing session files (at their byte offsets: a chunk already
        stored is kept), and replace the small ones droid rewrites, in one transaction."""

        def save(db: sqlite3.Connection) -> None:
            for name, data in replaces:
                db.execute("DELETE FROM session_files WHERE session_id = ? AND name = ?", (session_id, name))
                db.execute("INSERT INTO session_files VALUES (?, ?, 0, ?)", (session_id, name, data))
            db.executemany("INSERT INTO session_files VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                           [(session_id, name, start, data) for name, start, data in appends])

        await self._run(self._transaction, save)

    async def load_files(self, session_id: str) -> dict[str, bytes]:
        rows = await self._run(lambda: self._conn().execute(
            "SELECT name, start_byte, data FROM session_files WHERE session_id = ? ORDER BY name, start_byte",
            (session_id,)).fetchall())
        return assemble(rows)
