"""The SQLite store's locks: none to take, since no other node shares the file."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class SqliteLocks:
    """``Locks`` that exclude nobody."""

    def on_lock_loss(self, callback: Callable[[], None]) -> None:
        """Never: the process's own locks cannot be lost."""

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        """One node per SQLite file: the process's own locks are all it takes."""
        yield
