"""The durable store of sessions and turns: one contract (``base``), SQLite embedded by default."""

from .base import MAX_LIST_LIMIT, Page, SessionRecord, SessionStore, TurnRow, UnknownCursor
from .sqlite import MIGRATIONS, SqliteStore

__all__ = ["MAX_LIST_LIMIT", "MIGRATIONS", "Page", "SessionRecord", "SessionStore", "SqliteStore", "TurnRow",
           "UnknownCursor"]
