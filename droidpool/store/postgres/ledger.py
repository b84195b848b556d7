"""The PostgreSQL store's usage ledger: the row each recorded turn writes, and the ledger's reads.

A row's ``seq`` is taken under a transaction-scoped advisory lock held to its commit, so that the
order of ``seq`` is the order of commits (what ``ledger_entries`` relies on)."""

from __future__ import annotations

from typing import Any

import orjson

from ..base import LedgerEntry, LedgerGroup, LedgerQuery, TurnRow
from ..rows import LEDGER_SUMS, ledger_group, usage_counts
from .database import PostgresDatabase

LEDGER_LOCK = 0x6C656467  # "ledg": held from a ledger row's seq to its commit

_DIMENSION_SQL: dict[str, str] = {
    "key": "owner",
    "model": "CASE WHEN droid_model != '' THEN droid_model ELSE model END",
    "session": "session_id",
    "day": "to_char(to_timestamp(finished_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "dialect": "dialect",
    "status": "status",
    "bucket": "floor(finished_at / $3)::bigint::text",
}


async def insert_turn(conn: Any, turn: TurnRow, status: str, now: float) -> None:
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


class PostgresLedger(PostgresDatabase):
    """``LedgerStore``: sums and entries over the turns table."""

    async def ledger_entries(self, after: int, since: float, limit: int) -> list[LedgerEntry]:
        rows = await self._db().fetch(
            "SELECT seq, finished_at, owner, standard_tokens, factory_credits FROM turns "
            "WHERE seq > $1 AND finished_at >= $2 ORDER BY seq LIMIT $3", after, since, limit)
        return [LedgerEntry(int(r[0]), r[1], r[2], r[3], r[4]) for r in rows]

    async def ledger(self, query: LedgerQuery) -> list[LedgerGroup]:
        if "bucket" in query.by and query.bucket_s <= 0:
            raise ValueError("grouping by bucket needs bucket_s > 0")
        dims = [_DIMENSION_SQL[d] for d in query.by]
        params: list[Any] = [query.since, min(query.until, 1e18), query.bucket_s or 1.0]
        where = "finished_at >= $1 AND finished_at < $2 AND $3::float8 > 0"
        if query.owner is not None:
            params.append(query.owner)
            where += " AND owner = $4"
        select = ", ".join([*dims, *LEDGER_SUMS])
        ordinals = ", ".join(str(i + 1) for i in range(len(dims)))
        group = f" GROUP BY {ordinals} ORDER BY {ordinals}" if dims else ""
        rows = await self._db().fetch(f"SELECT {select} FROM turns WHERE {where}{group}", *params)
        return [ledger_group(r, len(dims)) for r in rows if r[len(dims)]]
