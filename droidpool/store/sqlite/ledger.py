"""The SQLite store's usage ledger: the row each recorded turn writes, and the ledger's reads."""

from __future__ import annotations

import sqlite3
from typing import Any

import orjson

from ..base import LedgerEntry, LedgerGroup, LedgerQuery, TurnRow
from ..rows import LEDGER_SUMS, ledger_group, usage_counts
from .database import SqliteDatabase

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


def insert_turn(db: sqlite3.Connection, turn: TurnRow, status: str, now: float) -> None:
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


class SqliteLedger(SqliteDatabase):
    """``LedgerStore``: sums and entries over the turns table."""

    async def ledger_entries(self, after: int, since: float, limit: int) -> list[LedgerEntry]:
        """Rows written after ``after`` (their rowid, which grows with each insert under the write
        lock) that finished at ``since`` or later, oldest write first, at most ``limit``."""
        rows = await self._run(lambda: self._conn().execute(
            "SELECT rowid, finished_at, owner, standard_tokens, factory_credits FROM turns "
            "WHERE rowid > ? AND finished_at >= ? ORDER BY rowid LIMIT ?", (after, since, limit)).fetchall())
        return [LedgerEntry(*r) for r in rows]

    async def ledger(self, query: LedgerQuery) -> list[LedgerGroup]:
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
