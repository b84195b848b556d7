"""The durable store of sessions and turns: one contract (``base``), SQLite embedded by default."""

from pathlib import Path

from .base import (
    MAX_LIST_LIMIT,
    ClusterStore,
    LedgerStore,
    Locks,
    NodeRegistry,
    Page,
    SessionFiles,
    SessionRecord,
    SessionRecords,
    SessionStore,
    TurnRow,
    UnknownCursor,
)
from .sqlite import MIGRATIONS, SqliteStore

__all__ = ["MAX_LIST_LIMIT", "MIGRATIONS", "ClusterStore", "LedgerStore", "Locks", "NodeRegistry", "Page",
           "SessionFiles", "SessionRecord", "SessionRecords", "SessionStore", "SqliteStore", "TurnRow",
           "UnknownCursor", "open_store"]


def open_store(url: str, path: Path, ttl_s: float) -> SessionStore:
    """The store ``store.url`` names: PostgreSQL for ``postgresql://...``, else SQLite at ``path``."""
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(url, ttl_s)
    return SqliteStore(path, ttl_s)
