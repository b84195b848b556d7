"""The shared store: sessions and turns in PostgreSQL (asyncpg), for several nodes on one database.

The same contract as the SQLite store (``base.SessionStore``); one contract-test suite runs against
both. Schema versions are numbered in ``droidpool_schema`` and applied under an advisory lock, so
nodes starting at once migrate once. Ledger rows get their ``seq`` under a transaction-scoped
advisory lock: the order of ``seq`` is the order of commits, which lets budget tallies read only
what is new (``ledger_entries``) without missing a row another node committed late.
"""

from __future__ import annotations

import builtins
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import orjson
import structlog

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

log = structlog.get_logger(__name__)

try:  # the optional ``postgres`` extra
    import asyncpg
except ImportError:  # pragma: no cover - reported when a postgresql:// store is configured
    asyncpg = None

LOCK_COMMAND_TIMEOUT_S = 10.0  # a partitioned store fails a lock request instead of hanging the node
MIGRATION_LOCK = 0x64726F69  # "droi": held while a node migrates
LEDGER_LOCK = 0x6C656467  # "ledg": held from a ledger row's seq to its commit

# Each entry upgrades the schema by one version. v1 is SQLite's v5 in one step.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE sessions (
        session_id TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        head_digest TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        turns BIGINT NOT NULL DEFAULT 0,
        input_tokens BIGINT NOT NULL DEFAULT 0,
        output_tokens BIGINT NOT NULL DEFAULT 0,
        cache_read_tokens BIGINT NOT NULL DEFAULT 0,
        cache_creation_tokens BIGINT NOT NULL DEFAULT 0,
        thinking_tokens BIGINT NOT NULL DEFAULT 0,
        conversation_key TEXT,
        parent_session_id TEXT,
        in_flight BOOLEAN NOT NULL DEFAULT FALSE,
        diverged BOOLEAN NOT NULL DEFAULT FALSE,
        failed_turns BIGINT NOT NULL DEFAULT 0,
        owner TEXT NOT NULL DEFAULT '',
        last_turn_id TEXT
    );
    CREATE INDEX sessions_head ON sessions (head_digest);
    CREATE INDEX sessions_updated ON sessions (updated_at);
    CREATE UNIQUE INDEX sessions_owner_conversation_key ON sessions (owner, conversation_key)
        WHERE conversation_key IS NOT NULL;
    CREATE INDEX sessions_owner_updated ON sessions (owner, updated_at);
    CREATE SEQUENCE turns_seq;
    CREATE TABLE turns (
        turn_id TEXT PRIMARY KEY,
        seq BIGINT NOT NULL UNIQUE,
        session_id TEXT NOT NULL,
        owner TEXT NOT NULL DEFAULT '',
        model TEXT NOT NULL,
        dialect TEXT NOT NULL,
        status TEXT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION NOT NULL,
        input_tokens BIGINT NOT NULL DEFAULT 0,
        output_tokens BIGINT NOT NULL DEFAULT 0,
        cache_read_tokens BIGINT NOT NULL DEFAULT 0,
        cache_creation_tokens BIGINT NOT NULL DEFAULT 0,
        thinking_tokens BIGINT NOT NULL DEFAULT 0,
        output BYTEA,
        droid_model TEXT NOT NULL DEFAULT '',
        conversation_key TEXT,
        factory_credits DOUBLE PRECISION NOT NULL DEFAULT 0,
        multiplier DOUBLE PRECISION,
        standard_tokens DOUBLE PRECISION NOT NULL DEFAULT 0,
        cost_source TEXT NOT NULL DEFAULT 'unrecorded',
        usd DOUBLE PRECISION
    );
    CREATE INDEX turns_session ON turns (session_id);
    CREATE INDEX turns_owner_finished ON turns (owner, finished_at);
    CREATE INDEX turns_finished ON turns (finished_at);
    """,
    # v2: several nodes (SQLite's v6): the registry, each session's node, droid's session files.
    """
    ALTER TABLE sessions ADD COLUMN node_id TEXT;
    CREATE INDEX sessions_node ON sessions (node_id);
    CREATE TABLE nodes (
        node_id TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        capacity BIGINT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        heartbeat_at DOUBLE PRECISION NOT NULL,
        state TEXT NOT NULL
    );
    CREATE TABLE session_files (
        session_id TEXT NOT NULL,
        name TEXT NOT NULL,
        start_byte BIGINT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (session_id, name, start_byte)
    );
    """,
    # v3: what each turn sent droid besides text (SQLite's v7).
    """
    ALTER TABLE turns ADD COLUMN attachments BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE turns ADD COLUMN attachment_bytes BIGINT NOT NULL DEFAULT 0;
    """,
)

_MATCHABLE = (
    "NOT in_flight AND NOT diverged AND conversation_key IS NULL "
    "AND NOT (parent_session_id IS NOT NULL AND turns = 0)"
)


def _add_usage(first: int) -> str:
    """``input_tokens = input_tokens + $first, ...`` for the five token counts."""
    names = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens", "thinking_tokens")
    return ", ".join(f"{n} = {n} + ${first + i}" for i, n in enumerate(names))


_DIMENSION_SQL: dict[str, str] = {
    "key": "owner",
    "model": "CASE WHEN droid_model != '' THEN droid_model ELSE model END",
    "session": "session_id",
    "day": "to_char(to_timestamp(finished_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "dialect": "dialect",
    "status": "status",
    "bucket": "floor(finished_at / $3)::bigint::text",
}


class _Locks:
    """One connection holding a node's advisory locks; its commands one at a time.

    Its ``generation`` grows with each new connection: a lock taken on an older one is gone (the
    server dropped it with that connection), which ``release`` reports."""

    def __init__(self, url: str, on_lost: Callable[[], None]) -> None:
        self.url = url
        self.on_lost = on_lost
        self._conn: Any = None
        self._mutex = anyio.Lock()
        self.generation = 0
        self.lost = 0  # locks found gone at release

    async def _connection(self) -> Any:
        if self._conn is None or self._conn.is_closed():
            # A new connection holds none of the old one's locks.
            self._conn = await asyncpg.connect(self.url, command_timeout=LOCK_COMMAND_TIMEOUT_S)
            self._conn.add_termination_listener(self._terminated)
            self.generation += 1
        return self._conn

    def _terminated(self, conn: Any) -> None:
        if conn is not self._conn:
            return
        log.error("store.lock_connection_lost", detail="the advisory locks this node held are gone: "
                                                       "the turns holding them are interrupted")
        self.on_lost()

    async def acquire(self, key: int) -> int:
        """Wait for ``key``; the connection generation it is held on."""
        delay = 0.002
        while True:
            # Shielded: a lock the server granted is never lost to a cancellation of the waiter
            # (the caller's ``finally`` releases it; nothing awaits between here and there).
            with anyio.CancelScope(shield=True):
                async with self._mutex:
                    conn = await self._connection()
                    if await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
                        return self.generation
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def release(self, key: int, generation: int) -> None:
        async with self._mutex:
            if generation != self.generation or self._conn is None or self._conn.is_closed():
                self.lost += 1
                log.error("store.lock_lost", detail="held on a connection that is gone: another node may have "
                                                    "entered the same session meanwhile")
                return
            await self._conn.fetchval("SELECT pg_advisory_unlock($1)", key)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


class PostgresStore:
    """A pool of asyncpg connections to one PostgreSQL database."""

    def __init__(self, url: str, ttl_s: float, *, clock: Callable[[], float] = time.time,
                 max_connections: int = 10) -> None:
        self.url = url
        self.ttl_s = ttl_s
        self.clock = clock
        self.max_connections = max_connections
        self._pool: Any = None
        self._locks: _Locks | None = None
        self._lock_loss: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return "<PostgresStore>"  # the URL may hold a password: never shown

    async def open(self) -> None:
        if asyncpg is None:
            raise RuntimeError("store.url is a PostgreSQL URL: install droidpool[postgres] (asyncpg)")
        self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=self.max_connections)
        async with self._pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
            try:
                await conn.execute("CREATE TABLE IF NOT EXISTS droidpool_schema (version INTEGER NOT NULL)")
                version = await conn.fetchval("SELECT max(version) FROM droidpool_schema") or 0
                if version > len(MIGRATIONS):
                    raise RuntimeError(f"schema version {version} is newer than this droidpool understands")
                for index in range(version, len(MIGRATIONS)):
                    async with conn.transaction():
                        await conn.execute(MIGRATIONS[index])
                        await conn.execute("INSERT INTO droidpool_schema (version) VALUES ($1)", index + 1)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)

    async def close(self) -> None:
        if self._locks is not None:
            await self._locks.close()
            self._locks = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def on_lock_loss(self, callback: Callable[[], None]) -> None:
        self._lock_loss.append(callback)

    def _locks_lost(self) -> None:
        for callback in self._lock_loss:
            callback()

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        """A session-level advisory lock on ``name``, shared by every node on this database.

        All of a node's locks live on one connection (bounded, whatever the number of turns):
        ``pg_try_advisory_lock`` is retried with back-off, since a blocking wait would hold that
        connection. The process serializes its own holders of a name before this, so only
        another node ever makes it wait. If the node dies, PostgreSQL drops its locks."""
        if self._locks is None:
            self._locks = _Locks(self.url, self._locks_lost)
        locks = self._locks
        key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)
        generation = await locks.acquire(key)
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await locks.release(key, generation)

    def _db(self) -> Any:
        if self._pool is None:
            raise RuntimeError("session store is not open")
        return self._pool

    def _cutoff(self) -> float:
        return self.clock() - self.ttl_s

    @staticmethod
    async def _release_expired_key(conn: Any, key: str, owner: str, cutoff: float) -> None:
        await conn.execute(
            "UPDATE sessions SET conversation_key = NULL WHERE owner = $1 AND conversation_key = $2 "
            "AND updated_at < $3", owner, key, cutoff)

    # --- reads -------------------------------------------------------------------------------

    async def get(self, session_id: str) -> SessionRecord | None:
        row = await self._db().fetchrow(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE session_id = $1 AND updated_at >= $2", session_id, self._cutoff())
        return session_record(row) if row else None

    async def by_key(self, key: str, owner: str = "") -> SessionRecord | None:
        row = await self._db().fetchrow(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE owner = $1 AND conversation_key = $2 AND updated_at >= $3",
            owner, key, self._cutoff())
        return session_record(row) if row else None

    async def find_head(self, digest: str) -> SessionRecord | None:
        row = await self._db().fetchrow(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE head_digest = $1 AND updated_at >= $2 AND {_MATCHABLE} "
            "ORDER BY updated_at DESC LIMIT 1", digest, self._cutoff())
        return session_record(row) if row else None

    async def list(self, limit: int = 100) -> builtins.list[SessionRecord]:
        return (await self.page(limit)).records

    async def page(
        self, limit: int = 100, after: str | None = None, *, expired: bool = False, owner: str | None = None
    ) -> Page:
        limit = max(1, min(limit, MAX_LIST_LIMIT))
        params: builtins.list[Any] = [-1.0 if expired else self._cutoff()]
        where = "updated_at >= $1"
        async with self._db().acquire() as conn:
            if owner is not None:
                params.append(owner)
                where += f" AND owner = ${len(params)}"
            if after is not None:
                anchor = await conn.fetchrow("SELECT updated_at, owner FROM sessions WHERE session_id = $1", after)
                if anchor is None or (owner is not None and anchor[1] != owner):
                    raise UnknownCursor(after)
                params += [anchor[0], after]
                a, b = len(params) - 1, len(params)
                where += f" AND (updated_at < ${a} OR (updated_at = ${a} AND session_id < ${b}))"
            params.append(limit + 1)
            rows = await conn.fetch(
                f"SELECT {SESSION_COLUMNS} FROM sessions WHERE {where} ORDER BY updated_at DESC, session_id DESC "
                f"LIMIT ${len(params)}", *params)
        return Page([session_record(r) for r in rows[:limit]], len(rows) > limit)

    async def all_ids(self) -> dict[str, bool]:
        rows = await self._db().fetch("SELECT session_id, updated_at >= $1 FROM sessions", self._cutoff())
        return {r[0]: bool(r[1]) for r in rows}

    async def interrupted(self, node_id: str | None = None) -> builtins.list[str]:
        rows = await self._db().fetch(
            "SELECT session_id FROM sessions WHERE in_flight AND (node_id IS NULL OR node_id = $1)", node_id)
        return [r[0] for r in rows]

    async def get_turn(self, turn_id: str, owner: str) -> TurnRow | None:
        row = await self._db().fetchrow(
            f"SELECT {KEPT_TURN_COLUMNS} FROM turns WHERE turn_id = $1 AND owner = $2 AND output IS NOT NULL",
            turn_id, owner)
        return kept_turn(row) if row is not None else None

    async def ledger_entries(self, after: int, since: float, limit: int) -> builtins.list[LedgerEntry]:
        rows = await self._db().fetch(
            "SELECT seq, finished_at, owner, standard_tokens, factory_credits FROM turns "
            "WHERE seq > $1 AND finished_at >= $2 ORDER BY seq LIMIT $3", after, since, limit)
        return [LedgerEntry(int(r[0]), r[1], r[2], r[3], r[4]) for r in rows]

    async def ledger(self, query: LedgerQuery) -> builtins.list[LedgerGroup]:
        if "bucket" in query.by and query.bucket_s <= 0:
            raise ValueError("grouping by bucket needs bucket_s > 0")
        dims = [_DIMENSION_SQL[d] for d in query.by]
        params: builtins.list[Any] = [query.since, min(query.until, 1e18), query.bucket_s or 1.0]
        where = "finished_at >= $1 AND finished_at < $2 AND $3::float8 > 0"
        if query.owner is not None:
            params.append(query.owner)
            where += " AND owner = $4"
        select = ", ".join([*dims, *LEDGER_SUMS])
        ordinals = ", ".join(str(i + 1) for i in range(len(dims)))
        group = f" GROUP BY {ordinals} ORDER BY {ordinals}" if dims else ""
        rows = await self._db().fetch(f"SELECT {select} FROM turns WHERE {where}{group}", *params)
        return [ledger_group(r, len(dims)) for r in rows if r[len(dims)]]

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
        async with self._db().acquire() as conn, conn.transaction():
            if conversation_key is not None:
                await self._release_expired_key(conn, conversation_key, owner, now - self.ttl_s)
            status = await conn.execute(
                "INSERT INTO sessions (session_id, model, created_at, updated_at, conversation_key, "
                "parent_session_id, head_digest, in_flight, diverged, owner) "
                "VALUES ($1, $2, $3, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
                session_id, model, now, conversation_key, parent_id, head_digest, in_flight, diverged, owner)
            if status.endswith(" 1"):
                return True
            # Nothing inserted: the same session again (fine), or its conversation id is taken.
            return bool(await conn.fetchval("SELECT 1 FROM sessions WHERE session_id = $1", session_id))

    async def bind_key(self, session_id: str, key: str, owner: str = "") -> bool:
        async with self._db().acquire() as conn, conn.transaction():
            await self._release_expired_key(conn, key, owner, self._cutoff())
            try:
                async with conn.transaction():  # a savepoint: the release above stays
                    await conn.execute("UPDATE sessions SET conversation_key = $1 WHERE session_id = $2",
                                       key, session_id)
            except asyncpg.UniqueViolationError:
                return False
            return True

    async def begin_turn(self, session_id: str) -> None:
        await self._db().execute(
            "UPDATE sessions SET diverged = diverged OR in_flight, in_flight = TRUE WHERE session_id = $1",
            session_id)

    async def recovered(self, session_id: str) -> None:
        await self._db().execute("UPDATE sessions SET in_flight = FALSE WHERE session_id = $1", session_id)

    async def complete_turn(self, turn: TurnRow, head_digest: str) -> None:
        now = self.clock()
        async with self._db().acquire() as conn, conn.transaction():
            await conn.execute(
                f"UPDATE sessions SET model = $1, head_digest = $2, updated_at = $3, turns = turns + 1, "
                f"in_flight = FALSE, last_turn_id = $4, {_add_usage(5)} WHERE session_id = $10",
                turn.model, head_digest, now, turn.turn_id, *usage_counts(turn.usage), turn.session_id)
            await self._insert_turn(conn, turn, "completed", now)

    async def fail_turn(self, turn: TurnRow, *, diverge: bool = True) -> None:
        now = self.clock()
        async with self._db().acquire() as conn, conn.transaction():
            await conn.execute(
                f"UPDATE sessions SET updated_at = $1, failed_turns = failed_turns + 1, in_flight = FALSE, "
                f"diverged = diverged OR $2, {_add_usage(3)} WHERE session_id = $8",
                now, diverge, *usage_counts(turn.usage), turn.session_id)
            await self._insert_turn(conn, turn, turn.status if turn.status != "completed" else "failed", now)

    @staticmethod
    async def _insert_turn(conn: Any, turn: TurnRow, status: str, now: float) -> None:
        """The turn's ledger row, once; its seq taken under a lock held to the commit."""
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LEDGER_LOCK)
        output = orjson.dumps(dict(turn.output)) if turn.output is not None else None
        await conn.execute(
            "INSERT INTO turns (turn_id, seq, session_id, owner, model, dialect, status, started_at, finished_at, "
            "input_tokens, output_tokens, cache_read_tokens, cache_creation_tokens, thinking_tokens, output, "
            "droid_model, conversation_key, factory_credits, multiplier, standard_tokens, cost_source, usd, "
            "attachments, attachment_bytes) "
            "VALUES ($1, nextval('turns_seq'), $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, "
            "$17, $18, $19, $20, $21, $22, $23) ON CONFLICT (turn_id) DO NOTHING",
            turn.turn_id, turn.session_id, turn.owner, turn.model, turn.dialect, status, turn.started_at,
            turn.finished_at if turn.finished_at is not None else now, *usage_counts(turn.usage), output,
            turn.droid_model, turn.conversation_key, turn.usage.factory_credits, turn.multiplier,
            turn.standard_tokens, turn.cost_source, turn.usd, turn.attachments, turn.attachment_bytes)

    async def forget_output(self, turn_id: str, owner: str) -> bool:
        status = await self._db().execute(
            "UPDATE turns SET output = NULL WHERE turn_id = $1 AND owner = $2 AND output IS NOT NULL",
            turn_id, owner)
        return bool(status != "UPDATE 0")

    async def delete(self, session_id: str) -> bool:
        async with self._db().acquire() as conn, conn.transaction():
            status = await conn.execute("DELETE FROM sessions WHERE session_id = $1", session_id)
            await conn.execute("DELETE FROM session_files WHERE session_id = $1", session_id)
            await conn.execute("UPDATE turns SET output = NULL WHERE session_id = $1 AND output IS NOT NULL",
                               session_id)
            return bool(status != "DELETE 0")

    async def sweep(self) -> int:
        cutoff = self._cutoff()
        async with self._db().acquire() as conn, conn.transaction():
            status = await conn.execute("DELETE FROM sessions WHERE updated_at < $1", cutoff)
            if not status.endswith(" 0"):
                await conn.execute("DELETE FROM session_files f WHERE NOT EXISTS "
                                   "(SELECT 1 FROM sessions s WHERE s.session_id = f.session_id)")
            await conn.execute("UPDATE turns SET output = NULL WHERE finished_at < $1 AND output IS NOT NULL", cutoff)
            return int(status.split()[-1])

    # --- several nodes ------------------------------------------------------------------------

    async def heartbeat(self, node: NodeRow) -> None:
        await self._db().execute(
            "INSERT INTO nodes (node_id, url, capacity, started_at, heartbeat_at, state) VALUES ($1, $2, $3, $4, $5, $6) "
            "ON CONFLICT (node_id) DO UPDATE SET url = excluded.url, capacity = excluded.capacity, "
            "heartbeat_at = excluded.heartbeat_at, state = excluded.state",
            node.node_id, node.url, node.capacity, node.started_at, node.heartbeat_at, node.state)

    async def nodes(self, sessions: bool = False) -> builtins.list[NodeRow]:
        """The registry; with ``sessions``, how many sessions each node holds (a count per node)."""
        count = "(SELECT COUNT(*) FROM sessions s WHERE s.node_id = n.node_id)" if sessions else "0"
        rows = await self._db().fetch(
            "SELECT n.node_id, n.url, n.capacity, n.started_at, n.heartbeat_at, n.state, "
            f"{count} FROM nodes n ORDER BY n.node_id")
        return [NodeRow(r[0], r[1], int(r[2]), r[3], r[4], r[5], int(r[6])) for r in rows]

    async def remove_node(self, node_id: str) -> None:
        await self._db().execute("DELETE FROM nodes WHERE node_id = $1", node_id)

    async def claim(self, session_id: str, node_id: str | None) -> None:
        await self._db().execute("UPDATE sessions SET node_id = $1 WHERE session_id = $2", node_id, session_id)

    async def release_node(self, node_id: str) -> int:
        status = await self._db().execute("UPDATE sessions SET node_id = NULL WHERE node_id = $1", node_id)
        return int(status.split()[-1])

    async def save_files(self, session_id: str, appends: builtins.list[tuple[str, int, bytes]],
                         replaces: builtins.list[tuple[str, bytes]]) -> None:
        async with self._db().acquire() as conn, conn.transaction():
            for name, data in replaces:
                await conn.execute("DELETE FROM session_files WHERE session_id = $1 AND name = $2", session_id, name)
                await conn.execute("INSERT INTO session_files VALUES ($1, $2, 0, $3)", session_id, name, data)
            if appends:
                await conn.executemany("INSERT INTO session_files VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                                       [(session_id, name, start, data) for name, start, data in appends])

    async def load_files(self, session_id: str) -> dict[str, bytes]:
        rows = await self._db().fetch(
            "SELECT name, start_byte, data FROM session_files WHERE session_id = $1 ORDER BY name, start_byte",
            session_id)
        return assemble((r[0], int(r[1]), bytes(r[2])) for r in rows)
