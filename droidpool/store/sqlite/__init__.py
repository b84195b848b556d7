"""The embedded store: sessions and turns in SQLite (WAL, synchronous=FULL), off the event loop.

One connection (``database``) opened onto one schema (``schema``), and one mixin over it per
concern of the contract (``..base``): session records, the ledger, the node registry and session
files, locks. ``SqliteStore`` is all of them.
"""

from __future__ import annotations

from .cluster import SqliteNodeRegistry, SqliteSessionFiles
from .ledger import SqliteLedger
from .locks import SqliteLocks
from .schema import MIGRATIONS
from .sessions import SqliteSessionRecords

__all__ = ["MIGRATIONS", "SqliteStore"]


class SqliteStore(SqliteSessionRecords, SqliteLedger, SqliteNodeRegistry, SqliteSessionFiles, SqliteLocks):
    """The whole ``SessionStore`` over one SQLite connection used from worker threads, one
    statement at a time."""

    def __repr__(self) -> str:
        return f"<SqliteStore {self.path}>"
