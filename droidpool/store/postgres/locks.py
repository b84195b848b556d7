"""The PostgreSQL store's locks: advisory locks by name, shared by every node on the database."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio

from .database import LockConnection, PostgresDatabase


class PostgresLocks(PostgresDatabase):
    """``Locks`` on the node's one lock connection (``LockConnection``)."""

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
            self._locks = LockConnection(self.url, self._locks_lost)
        locks = self._locks
        key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)
        generation = await locks.acquire(key)
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await locks.release(key, generation)
