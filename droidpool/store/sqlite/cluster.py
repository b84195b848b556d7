"""The SQLite store's side of several nodes: the node registry, and droid's session files."""

from __future__ import annotations

import sqlite3

from ..base import NodeRow, assemble
from .database import SqliteDatabase


class SqliteNodeRegistry(SqliteDatabase):
    """``NodeRegistry``: the nodes table, and which node holds each session's worker."""

    async def heartbeat(self, node: NodeRow) -> None:
        await self._run(lambda: self._conn().execute(
            "INSERT INTO nodes (node_id, url, capacity, started_at, heartbeat_at, state) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (node_id) DO UPDATE SET url = excluded.url, capacity = excluded.capacity, "
            "heartbeat_at = excluded.heartbeat_at, state = excluded.state",
            (node.node_id, node.url, node.capacity, node.started_at, node.heartbeat_at, node.state)))

    async def nodes(self, sessions: bool = False) -> list[NodeRow]:
        """The registry; with ``sessions``, how many sessions each node holds (a count per node)."""
        count = "(SELECT COUNT(*) FROM sessions s WHERE s.node_id = n.node_id)" if sessions else "0"
        rows = await self._run(lambda: self._conn().execute(
            "SELECT n.node_id, n.url, n.capacity, n.started_at, n.heartbeat_at, n.state, "
            f"{count} FROM nodes n ORDER BY n.node_id").fetchall())
        return [NodeRow(*r) for r in rows]

    async def remove_node(self, node_id: str) -> None:
        await self._run(lambda: self._conn().execute("DELETE FROM nodes WHERE node_id = ?", (node_id,)))

    async def claim(self, session_id: str, node_id: str | None) -> None:
        await self._run(lambda: self._conn().execute(
            "UPDATE sessions SET node_id = ? WHERE session_id = ?", (node_id, session_id)))

    async def release_node(self, node_id: str) -> int:
        cursor = await self._run(lambda: self._conn().execute(
            "UPDATE sessions SET node_id = NULL WHERE node_id = ?", (node_id,)))
        return int(cursor.rowcount)


class SqliteSessionFiles(SqliteDatabase):
    """``SessionFiles``: droid's files as chunks in the session_files table."""

    async def save_files(self, session_id: str, appends: list[tuple[str, int, bytes]],
                         replaces: list[tuple[str, bytes]]) -> None:
        """Append chunks of droid's growing session files (at their byte offsets: a chunk already
        stored is kept), and replace the small ones droid rewrites, in one transaction."""

        def save(db: sqlite3.Connection) -> None:
            for name, data in replaces:
                db.execute("DELETE FROM session_files WHERE session_id = ? AND name = ?", (session_id, name))
                db.execute("INSERT INTO session_files VALUES (?, ?, 0, ?)", (session_id, name, data))
            db.executemany("INSERT INTO session_files VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                           [(session_id, name, start, data) for name, start, data in appends])

        await self._run(self._transaction, save)

    async def load_files(self, session_id: str) -> dict[str, bytes]:
        rows = await self._run(lambda: self._conn().execute(
            "SELECT name, start_byte, data FROM session_files WHERE session_id = ? ORDER BY name, start_byte",
            (session_id,)).fetchall())
        return assemble(rows)
