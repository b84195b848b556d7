"""What both backends read and write the same way: the session and ledger columns, and their rows
turned into records (SQLite gives ints, PostgreSQL may give other number types: all are converted)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import orjson

from droidpool.droid.protocol import Usage

from .base import LedgerGroup, SessionRecord, TurnRow

SESSION_COLUMNS = (
    "session_id, model, head_digest, created_at, updated_at, turns, input_tokens, output_tokens, "
    "cache_read_tokens, cache_creation_tokens, thinking_tokens, conversation_key, "
    "parent_session_id, in_flight, diverged, failed_turns, owner, last_turn_id, node_id"
)
KEPT_TURN_COLUMNS = (
    "turn_id, session_id, model, input_tokens, output_tokens, cache_read_tokens, "
    "cache_creation_tokens, thinking_tokens, started_at, owner, dialect, output, status"
)
# The ledger's sums, after its group-by dimensions (``ledger_group`` reads them back).
LEDGER_SUMS = (
    "COUNT(*)", "SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END)", "SUM(input_tokens)", "SUM(output_tokens)",
    "SUM(cache_read_tokens)", "SUM(cache_creation_tokens)", "SUM(thinking_tokens)", "SUM(factory_credits)",
    "SUM(standard_tokens)", "COALESCE(SUM(usd), 0)", "SUM(attachments)", "SUM(attachment_bytes)",
)


def usage_counts(usage: Usage) -> tuple[int, int, int, int, int]:
    """The five token counts, in the order of the columns."""
    return (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens,
            usage.cache_creation_tokens, usage.thinking_tokens)


def _usage(values: Sequence[Any]) -> Usage:
    return Usage(*(int(v or 0) for v in values))


def session_record(row: Sequence[Any]) -> SessionRecord:
    """A ``SESSION_COLUMNS`` row."""
    return SessionRecord(
        row[0], row[1], row[2], row[3], row[4], int(row[5]), _usage(row[6:11]),
        row[11], row[12], bool(row[13]), bool(row[14]), int(row[15]), row[16], row[17], row[18],
    )


def kept_turn(row: Sequence[Any]) -> TurnRow:
    """A ``KEPT_TURN_COLUMNS`` row (its output is there)."""
    return TurnRow(row[0], row[1], row[2], _usage(row[3:8]), row[8], row[9], row[10], orjson.loads(row[11]),
                   row[12])


def ledger_group(row: Sequence[Any], dimensions: int) -> LedgerGroup:
    """A row of ``dimensions`` group values followed by ``LEDGER_SUMS``."""
    n = dimensions
    return LedgerGroup(tuple(str(v) for v in row[:n]), int(row[n]), int(row[n + 1] or 0),
                       replace(_usage(row[n + 2:n + 7]), factory_credits=float(row[n + 7] or 0)),
                       float(row[n + 8] or 0), float(row[n + 9] or 0), int(row[n + 10] or 0), int(row[n + 11] or 0))
