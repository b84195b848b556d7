"""The PostgreSQL store's session records: lookups, the session list, turn bookkeeping, expiry."""

from __future__ import annotations

import builtins
from typing import Any

from ..base import MAX_LIST_LIMIT, Page, SessionRecord, TurnRow, UnknownCursor
from ..rows import KEPT_TURN_COLUMNS, SESSION_COLUMNS, kept_turn, session_record, usage_counts
from .database import PostgresDatabase, asyncpg
from .ledger import insert_turn

_MATCHABLE = (
    "NOT in_flight AND NOT diverged AND conversation_key IS NULL "
    "AND NOT (parent_session_id IS NOT NULL AND turns = 0)"
)


def _add_usage(first: int) -> str:
    """``input_tokens = input_tokens + $first, ...`` for the five token counts."""
    names = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens", "thinking_tokens")
    return ", ".join(f"{n} = {n} + ${first + i}" for i, n in enumerate(names))


class PostgresSessionRecords(PostgresDatabase):
    """``SessionRecords``: the sessions table, and the turns recorded on it."""

    def _cutoff(self) -> float:
        return self.clock() - self.ttl_s

    @staticmethod
    async def _release_expired_key(conn: Any, key: str, owner: str, cutoff: float) -> None:
        await conn.execute(
            "UPDATE sessions SET conversation_key = NULL WHERE owner = $1 AND conversation_key = $2 "
            "AND updated_at < $3", owner, key, cutoff)

    # --- reads -------------------------------------------------------------------------------

    async def get(self, session_id: str) -> SessionRecord | None:
        row = await self._db().fetchrow(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE session_id = $1 AND updated_at >= $2", session_id, self._cutoff())
        return session_record(row) if row else None

    async def by_key(self, key: str, owner: str = "") -> SessionRecord | None:
        row = await self._db().fetchrow(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE owner = $1 AND conversation_key = $2 AND updated_at >= $3",
            owner, key, self._cutoff())
        return session_record(row) if row else None

    async def find_head(self, digest: str) -> SessionRecord | None:
        row = await self._db().fetchrow(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE head_digest = $1 AND updated_at >= $2 AND {_MATCHABLE} "
            "ORDER BY updated_at DESC LIMIT 1", digest, self._cutoff())
        return session_record(row) if row else None

    async def list(self, limit: int = 100) -> builtins.list[SessionRecord]:
        return (await self.page(limit)).records

    async def page(
        self, limit: int = 100, after: str | None = None, *, expired: bool = False, owner: str | None = None
    ) -> Page:
        limit = max(1, min(limit, MAX_LIST_LIMIT))
        params: builtins.list[Any] = [-1.0 if expired else self._cutoff()]
        where = "updated_at >= $1"
        async with self._db().acquire() as conn:
            if owner is not None:
                params.append(owner)
                where += f" AND owner = ${len(params)}"
            if after is not None:
                anchor = await conn.fetchrow("SELECT updated_at, owner FROM sessions WHERE session_id = $1", after)
                if anchor is None or (owner is not None and anchor[1] != owner):
                    raise UnknownCursor(after)
                params += [anchor[0], after]
                a, b = len(params) - 1, len(params)
                where += f" AND (updated_at < ${a} OR (updated_at = ${a} AND session_id < ${b}))"
            params.append(limit + 1)
            rows = await conn.fetch(
                f"SELECT {SESSION_COLUMNS} FROM sessions WHERE {where} ORDER BY updated_at DESC, session_id DESC "
                f"LIMIT ${len(params)}", *params)
        return Page([session_record(r) for r in rows[:limit]], len(rows) > limit)

    async def all_ids(self) -> dict[str, bool]:
        rows = await self._db().fetch("SELECT session_id, updated_at >= $1 FROM sessions", self._cutoff())
        return {r[0]: bool(r[1]) for r in rows}

    async def interrupted(self, node_id: str | None = None) -> builtins.list[str]:
        rows = await self._db().fetch(
            "SELECT session_id FROM sessions WHERE in_flight AND (node_id IS NULL OR node_id = $1)", node_id)
        return [r[0] for r in rows]

    async def get_turn(self, turn_id: str, owner: str) -> TurnRow | None:
        row = await self._db().fetchrow(
            f"SELECT {KEPT_TURN_COLUMNS} FROM turns WHERE turn_id = $1 AND owner = $2 AND output IS NOT NULL",
            turn_id, owner)
        return kept_turn(row) if row is not None else None

    # --- writes ------------------------------------------------------------------------------

    async def create(
        self,
        session_id: str,
        model: str,
        *,
        conversation_key: str | None = None,
        parent_id: str | None = None,
        head_digest: str | None = None,
        in_flight: bool = False,
        diverged: bool = False,
        owner: str = "",
    ) -> bool:
        """Record a new session; False if ``conversation_key`` already names a live session."""
        now = self.clock()
        async with self._db().acquire() as conn, conn.transaction():
            if conversation_key is not None:
                await self._release_expired_key(conn, conversation_key, owner, now - self.ttl_s)
            status = await conn.execute(
                "INSERT INTO sessions (session_id, model, created_at, updated_at, conversation_key, "
                "parent_session_id, head_digest, in_flight, diverged, owner) "
                "VALUES ($1, $2, $3, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
                session_id, model, now, conversation_key, parent_id, head_digest, in_flight, diverged, owner)
            if status.endswith(" 1"):
                return True
            # Nothing inserted: the same session again (fine), or its conversation id is taken.
            return bool(await conn.fetchval("SELECT 1 FROM sessions WHERE session_id = $1", session_id))

    async def bind_key(self, session_id: str, key: str, owner: str = "") -> bool:
        async with self._db().acquire() as conn, conn.transaction():
            await self._release_expired_key(conn, key, owner, self._cutoff())
            try:
                async with conn.transaction():  # a savepoint: the release above stays
                    await conn.execute("UPDATE sessions SET conversation_key = $1 WHERE session_id = $2",
                                       key, session_id)
            except asyncpg.UniqueViolationError:
                return False
            return True

    async def begin_turn(self, session_id: str) -> None:
        await self._db().execute(
            "UPDATE sessions SET diverged = diverged OR in_flight, in_flight = TRUE WHERE session_id = $1",
            session_id)

    async def recovered(self, session_id: str) -> None:
        await self._db().execute("UPDATE sessions SET in_flight = FALSE WHERE session_id = $1", session_id)

    async def complete_turn(self, turn: TurnRow, head_digest: str) -> None:
        now = self.clock()
        async with self._db().acquire() as conn, conn.transaction():
            await conn.execute(
                f"UPDATE sessions SET model = $1, head_digest = $2, updated_at = $3, turns = turns + 1, "
                f"in_flight = FALSE, last_turn_id = $4, {_add_usage(5)} WHERE session_id = $10",
                turn.model, head_digest, now, turn.turn_id, *usage_counts(turn.usage), turn.session_id)
            await insert_turn(conn, turn, "completed", now)

    async def fail_turn(self, turn: TurnRow, *, diverge: bool = True) -> None:
        now = self.clock()
        async with self._db().acquire() as conn, conn.transaction():
            await conn.execute(
                f"UPDATE sessions SET updated_at = $1, failed_turns = failed_turns + 1, in_flight = FALSE, "
                f"diverged = diverged OR $2, {_add_usage(3)} WHERE session_id = $8",
                now, diverge, *usage_counts(turn.usage), turn.session_id)
            await insert_turn(conn, turn, turn.status if turn.status != "completed" else "failed", now)

    async def forget_output(self, turn_id: str, owner: str) -> bool:
        status = await self._db().execute(
            "UPDATE turns SET output = NULL WHERE turn_id = $1 AND owner = $2 AND output IS NOT NULL",
            turn_id, owner)
        return bool(status != "UPDATE 0")

    async def delete(self, session_id: str) -> bool:
        async with self._db().acquire() as conn, conn.transaction():
            status = await conn.execute("DELETE FROM sessions WHERE session_id = $1", session_id)
            await conn.execute("DELETE FROM session_files WHERE session_id = $1", session_id)
            await conn.execute("UPDATE turns SET output = NULL WHERE session_id = $1 AND output IS NOT NULL",
                               session_id)
            return bool(status != "DELETE 0")

    async def sweep(self) -> int:
        cutoff = self._cutoff()
        async with self._db().acquire() as conn, conn.transaction():
            status = await conn.execute("DELETE FROM sessions WHERE updated_at < $1", cutoff)
            if not status.endswith(" 0"):
                await conn.execute("DELETE FROM session_files f WHERE NOT EXISTS "
                                   "(SELECT 1 FROM sessions s WHERE s.session_id = f.session_id)")
            await conn.execute("UPDATE turns SET output = NULL WHERE finished_at < $1 AND output IS NOT NULL", cutoff)
            return int(status.split()[-1])
