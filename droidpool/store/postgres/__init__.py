"""The shared store: sessions and turns in PostgreSQL (asyncpg), for several nodes on one database.

The same contract as the SQLite store (``base.SessionStore``); one contract-test suite runs against
both. Schema versions are numbered in ``droidpool_schema`` and applied under an advisory lock, so
nodes starting at once migrate once. Ledger rows get their ``seq`` under a transaction-scoped
advisory lock: the order of ``seq`` is the order of commits, which lets budget tallies read only
what is new (``ledger_entries``) without missing a row another node committed late.

One pool of connections and one lock connection (``database``), one schema (``schema``), and one
mixin over them per concern of the contract: session records, the ledger, the node registry and
session files, locks. ``PostgresStore`` is all of them.
"""

from __future__ import annotations

from .cluster import PostgresNodeRegistry, PostgresSessionFiles
from .ledger import PostgresLedger
from .locks import PostgresLocks
from .schema import MIGRATIONS
from .sessions import PostgresSessionRecords

__all__ = ["MIGRATIONS", "PostgresStore"]


class PostgresStore(PostgresSessionRecords, PostgresLedger, PostgresNodeRegistry, PostgresSessionFiles,
                    PostgresLocks):
    """The whole ``SessionStore`` over a pool of asyncpg connections to one PostgreSQL database."""

    def __repr__(self) -> str:
        return "<PostgresStore>"  # the URL may hold a password: never shown
