"""The SQLite store's session records: lookups, the session list, turn bookkeeping, expiry."""

from __future__ import annotations

import builtins
import sqlite3
from typing import Any

from ..base import MAX_LIST_LIMIT, Page, SessionRecord, TurnRow, UnknownCursor
from ..rows import KEPT_TURN_COLUMNS, SESSION_COLUMNS, kept_turn, session_record, usage_counts
from .database import SqliteDatabase
from .ledger import insert_turn

_MATCHABLE = (
    "in_flight = 0 AND diverged = 0 AND conversation_key IS NULL "
    "AND NOT (parent_session_id IS NOT NULL AND turns = 0)"
)
_ADD_USAGE = (
    "input_tokens = input_tokens + ?, output_tokens = output_tokens + ?, "
    "cache_read_tokens = cache_read_tokens + ?, cache_creation_tokens = cache_creation_tokens + ?, "
    "thinking_tokens = thinking_tokens + ?"
)


class SqliteSessionRecords(SqliteDatabase):
    """``SessionRecords``: the sessions table, and the turns recorded on it."""

    def _cutoff(self) -> float:
        return self.clock() - self.ttl_s

    def _release_expired_key(self, db: sqlite3.Connection, key: str, owner: str) -> None:
        """An expired session gives up its conversation id (it is invisible anyway)."""
        db.execute(
            "UPDATE sessions SET conversation_key = NULL WHERE owner = ? AND conversation_key = ? "
            "AND updated_at < ?",
            (owner, key, self._cutoff()),
        )

    # --- reads -------------------------------------------------------------------------------

    async def get(self, session_id: str) -> SessionRecord | None:
        """The live (unexpired) session with this id."""
        cutoff = self._cutoff()
        row = await self._run(
            lambda: self._conn().execute(
                f"SELECT {SESSION_COLUMNS} FROM sessions WHERE session_id = ? AND updated_at >= ?",
                (session_id, cutoff),
            ).fetchone()
        )
        return session_record(row) if row else None

    async def by_key(self, key: str, owner: str = "") -> SessionRecord | None:
        """The live session a client (``owner``) named with this conversation id."""
        cutoff = self._cutoff()
        row = await self._run(
            lambda: self._conn().execute(
                f"SELECT {SESSION_COLUMNS} FROM sessions WHERE owner = ? AND conversation_key = ? AND updated_at >= ?",
                (owner, key, cutoff),
            ).fetchone()
        )
        return session_record(row) if row else None

    async def find_head(self, digest: str) -> SessionRecord | None:
        """The live session a stateless resend of history ``digest`` may continue."""
        cutoff = self._cutoff()
        row = await self._run(
            lambda: self._conn().execute(
                f"SELECT {SESSION_COLUMNS} FROM sessions WHERE head_digest = ? AND updated_at >= ? "
                f"AND {_MATCHABLE} ORDER BY updated_at DESC LIMIT 1",
                (digest, cutoff),
            ).fetchone()
        )
        return session_record(row) if row else None

    async def list(self, limit: int = 100) -> list[SessionRecord]:
        """The ``limit`` most recently updated live sessions."""
        return (await self.page(limit)).records

    async def page(
        self, limit: int = 100, after: str | None = None, *, expired: bool = False, owner: str | None = None
    ) -> Page:
        """Sessions by most recent update (then id), ``limit`` at a time, from after ``after``.

        A session updated between two pages moves to the front: paging may then miss or
        repeat it. Raises UnknownCursor if ``after`` names no session.
        """
        limit = max(1, min(limit, MAX_LIST_LIMIT))
        cutoff = -1.0 if expired else self._cutoff()

        def query() -> list[Any]:
            db = self._conn()
            where = "updated_at >= ?"
            params: list[Any] = [cutoff]
            if owner is not None:
                where += " AND owner = ?"
                params.append(owner)
            if after is not None:
                anchor = db.execute(
                    "SELECT updated_at, owner FROM sessions WHERE session_id = ?", (after,)
                ).fetchone()
                if anchor is None or (owner is not None and anchor[1] != owner):  # not theirs: unknown
                    raise UnknownCursor(after)
                where += " AND (updated_at < ? OR (updated_at = ? AND session_id < ?))"
                params += [anchor[0], anchor[0], after]
            return db.execute(
                f"SELECT {SESSION_COLUMNS} FROM sessions WHERE {where} "
                "ORDER BY updated_at DESC, session_id DESC LIMIT ?",
                (*params, limit + 1),
            ).fetchall()

        rows = await self._run(query)
        return Page([session_record(r) for r in rows[:limit]], len(rows) > limit)

    async def all_ids(self) -> dict[str, bool]:
        """Every stored session id, expired or not → whether it is still live."""
        cutoff = self._cutoff()
        rows = await self._run(
            lambda: self._conn().execute("SELECT session_id, updated_at >= ? FROM sessions", (cutoff,)).fetchall()
        )
        return {r[0]: bool(r[1]) for r in rows}

    async def interrupted(self, node_id: str | None = None) -> builtins.list[str]:
        """Sessions with a turn that reached droid and was never recorded (droidpool died in it)."""
        rows = await self._run(lambda: self._conn().execute(
            "SELECT session_id FROM sessions WHERE in_flight = 1 AND (node_id IS NULL OR node_id = ?)",
            (node_id,)).fetchall())
        return [r[0] for r in rows]

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

        def insert(db: sqlite3.Connection) -> bool:
            if conversation_key is not None:
                self._release_expired_key(db, conversation_key, owner)
            try:
                db.execute(
                    "INSERT INTO sessions (session_id, model, created_at, updated_at, "
                    "conversation_key, parent_session_id, head_digest, in_flight, diverged, owner) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (session_id) DO NOTHING",
                    (session_id, model, now, now, conversation_key, parent_id, head_digest,
                     int(in_flight), int(diverged), owner),
                )
            except sqlite3.IntegrityError:
                return False
            return True

        return await self._run(self._transaction, insert)

    async def bind_key(self, session_id: str, key: str, owner: str = "") -> bool:
        """Name a session with a conversation id; False if the id names another live session."""

        def bind(db: sqlite3.Connection) -> bool:
            self._release_expired_key(db, key, owner)
            try:
                db.execute("UPDATE sessions SET conversation_key = ? WHERE session_id = ?", (key, session_id))
            except sqlite3.IntegrityError:
                return False
            return True

        return await self._run(self._transaction, bind)

    async def begin_turn(self, session_id: str) -> None:
        """Durably note a turn is about to reach droid: if droidpool dies before the turn is
        recorded, the session stays off stateless matching (droid may hold the message)."""
        await self._run(
            lambda: self._conn().execute(
                "UPDATE sessions SET diverged = diverged | in_flight, in_flight = 1 WHERE session_id = ?",
                (session_id,),
            )
        )

    async def recovered(self, session_id: str) -> None:
        """droid's files of an interrupted session hold no more than its recorded turns again."""
        await self._run(lambda: self._conn().execute(
            "UPDATE sessions SET in_flight = 0 WHERE session_id = ?", (session_id,)))

    async def complete_turn(self, turn: TurnRow, head_digest: str) -> None:
        """Record a completed turn and move the session's head, in one transaction."""
        now = self.clock()

        def complete(db: sqlite3.Connection) -> None:
            db.execute(
                f"UPDATE sessions SET model = ?, head_digest = ?, updated_at = ?, turns = turns + 1, "
                f"in_flight = 0, last_turn_id = ?, {_ADD_USAGE} WHERE session_id = ?",
                (turn.model, head_digest, now, turn.turn_id, *usage_counts(turn.usage), turn.session_id),
            )
            insert_turn(db, turn, "completed", now)

        await self._run(self._transaction, complete)

    async def fail_turn(self, turn: TurnRow, *, diverge: bool = True) -> None:
        """A turn that reached droid but did not complete: count its tokens (droid spent them),
        keep the head, and (``diverge``) keep stateless resends off this session from now on."""
        now = self.clock()

        def fail(db: sqlite3.Connection) -> None:
            db.execute(
                f"UPDATE sessions SET updated_at = ?, failed_turns = failed_turns + 1, in_flight = 0, "
                f"diverged = diverged | ?, {_ADD_USAGE} WHERE session_id = ?",
                (now, int(diverge), *usage_counts(turn.usage), turn.session_id),
            )
            insert_turn(db, turn, turn.status if turn.status != "completed" else "failed", now)

        await self._run(self._transaction, fail)

    async def get_turn(self, turn_id: str, owner: str) -> TurnRow | None:
        """A turn whose output was kept, if it is ``owner``'s."""
        row = await self._run(
            lambda: self._conn().execute(
                f"SELECT {KEPT_TURN_COLUMNS} FROM turns WHERE turn_id = ? AND owner = ? AND output IS NOT NULL",
                (turn_id, owner),
            ).fetchone()
        )
        return kept_turn(row) if row is not None else None

    async def forget_output(self, turn_id: str, owner: str) -> bool:
        """Drop a kept output (the turn's usage stays); False if there was none of ``owner``'s."""
        cursor = await self._run(
            lambda: self._conn().execute(
                "UPDATE turns SET output = NULL WHERE turn_id = ? AND owner = ? AND output IS NOT NULL",
                (turn_id, owner),
            )
        )
        return bool(cursor.rowcount > 0)

    async def delete(self, session_id: str) -> bool:
        """Forget a session and the outputs kept of its turns (their usage rows stay)."""

        def delete(db: sqlite3.Connection) -> bool:
            gone = db.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,)).rowcount > 0
            db.execute("DELETE FROM session_files WHERE session_id = ?", (session_id,))
            db.execute("UPDATE turns SET output = NULL WHERE session_id = ? AND output IS NOT NULL", (session_id,))
            return bool(gone)

        return await self._run(self._transaction, delete)

    async def sweep(self) -> int:
        """Delete expired sessions, and drop the outputs kept of turns as old; returns how many
        sessions went."""
        cutoff = self._cutoff()

        def sweep(db: sqlite3.Connection) -> int:
            swept = db.execute("DELETE FROM sessions WHERE updated_at < ?", (cutoff,)).rowcount
            if swept:
                db.execute("DELETE FROM session_files WHERE session_id NOT IN (SELECT session_id FROM sessions)")
            db.execute("UPDATE turns SET output = NULL WHERE finished_at < ? AND output IS NOT NULL", (cutoff,))
            return int(swept)

        return await self._run(self._transaction, sweep)
