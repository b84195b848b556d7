"""The PostgreSQL store's side of several nodes: the node registry, and droid's session files."""

from __future__ import annotations

from ..base import NodeRow, assemble
from .database import PostgresDatabase


class PostgresNodeRegistry(PostgresDatabase):
    """``NodeRegistry``: the nodes table, and which node holds each session's worker."""

    async def heartbeat(self, node: NodeRow) -> None:
        await self._db().execute(
            "INSERT INTO nodes (node_id, url, capacity, started_at, heartbeat_at, state) VALUES ($1, $2, $3, $4, $5, $6) "
            "ON CONFLICT (node_id) DO UPDATE SET url = excluded.url, capacity = excluded.capacity, "
            "heartbeat_at = excluded.heartbeat_at, state = excluded.state",
            node.node_id, node.url, node.capacity, node.started_at, node.heartbeat_at, node.state)

    async def nodes(self, sessions: bool = False) -> list[NodeRow]:
        """The registry; with ``sessions``, how many sessions each node holds (a count per node)."""
        count = "(SELECT COUNT(*) FROM sessions s WHERE s.node_id = n.node_id)" if sessions else "0"
        rows = await self._db().fetch(
            "SELECT n.node_id, n.url, n.capacity, n.started_at, n.heartbeat_at, n.state, "
            f"{count} FROM nodes n ORDER BY n.node_id")
        return [NodeRow(r[0], r[1], int(r[2]), r[3], r[4], r[5], int(r[6])) for r in rows]

    async def remove_node(self, node_id: str) -> None:
        await self._db().execute("DELETE FROM nodes WHERE node_id = $1", node_id)

    async def claim(self, session_id: str, node_id: str | None) -> None:
        await self._db().execute("UPDATE sessions SET node_id = $1 WHERE session_id = $2", node_id, session_id)

    async def release_node(self, node_id: str) -> int:
        status = await self._db().execute("UPDATE sessions SET node_id = NULL WHERE node_id = $1", node_id)
        return int(status.split()[-1])


class PostgresSessionFiles(PostgresDatabase):
    """``SessionFiles``: droid's files as chunks in the session_files table."""

    async def save_files(self, session_id: str, appends: list[tuple[str, int, bytes]],
                         replaces: list[tuple[str, bytes]]) -> None:
        async with self._db().acquire() as conn, conn.transaction():
            for name, data in replaces:
                await conn.execute("DELETE FROM session_files WHERE session_id = $1 AND name = $2", session_id, name)
                await conn.execute("INSERT INTO session_files VALUES ($1, $2, 0, $3)", session_id, name, data)
            if appends:
                await conn.executemany("INSERT INTO session_files VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                                       [(session_id, name, start, data) for name, start, data in appends])

    async def load_files(self, session_id: str) -> dict[str, bytes]:
        rows = await self._db().fetch(
            "SELECT name, start_byte, data FROM session_files WHERE session_id = $1 ORDER BY name, start_byte",
            session_id)
        return assemble((r[0], int(r[1]), bytes(r[2])) for r in rows)
