"""The PostgreSQL store's connections: a pool for its statements, opened onto the current schema,
and one connection holding the node's advisory locks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio
import structlog

from .schema import MIGRATIONS

__all__ = ["LOCK_COMMAND_TIMEOUT_S", "MIGRATION_LOCK", "LockConnection", "PostgresDatabase", "asyncpg"]

log = structlog.get_logger(__name__)

try:  # the optional ``postgres`` extra
    import asyncpg
except ImportError:  # pragma: no cover - reported when a postgresql:// store is configured
    asyncpg = None

LOCK_COMMAND_TIMEOUT_S = 10.0  # a partitioned store fails a lock request instead of hanging the node
MIGRATION_LOCK = 0x64726F69  # "droi": held while a node migrates


class LockConnection:
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


class PostgresDatabase:
    """The connections every concern's statements run on (each concern is a mixin over this)."""

    def __init__(self, url: str, ttl_s: float, *, clock: Callable[[], float] = time.time,
                 max_connections: int = 10) -> None:
        self.url = url
        self.ttl_s = ttl_s
        self.clock = clock
        self.max_connections = max_connections
        self._pool: Any = None
        self._locks: LockConnection | None = None
        self._lock_loss: list[Callable[[], None]] = []

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

    def _db(self) -> Any:
        if self._pool is None:
            raise RuntimeError("session store is not open")
        return self._pool
