"""Several nodes, one service: where a session's turn runs (here, forwarded to the node holding its
worker, or taken over), the node registry's heartbeat, and droid's session files kept in the
shared store so that any node can take a session over."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anyio
import structlog

from droidpool.droid.sessions import (
    GROWING,
    complete_lines,
    restore_session_files,
    session_file_paths,
)
from droidpool.store.base import ClusterStore, NodeRow, SessionRecord

from . import conversation
from .access import Access
from .model import TurnRequest
from .sessions import Sessions

log = structlog.get_logger(__name__)

Route = Literal["local", "forward", "takeover"]
MAX_TRACKED = 10_000  # sessions whose stored file sizes a node remembers
NODE_SECRET_HEADER = "X-Droidpool-Node-Secret"
FORWARDED_BY_HEADER = "X-Droidpool-Forwarded-By"


@dataclass(frozen=True)
class Decision:
    route: Route
    url: str | None = None  # where to forward
    holder: str | None = None


def route(holder: str | None, me: str, nodes: Mapping[str, NodeRow], now: float, dead_after_s: float) -> Decision:
    """Where a turn on a session held by ``holder`` runs: here if this node holds it; at the holder
    while it is alive (its heartbeat is recent and it is not stopping); else here, taking it over."""
    if holder == me:
        return Decision("local", holder=holder)
    node = nodes.get(holder) if holder is not None else None
    if node is None or node.state != "serving" or now - node.heartbeat_at > dead_after_s:
        return Decision("takeover", holder=holder)
    return Decision("forward", node.url, holder)


class Forward(Exception):
    """This request's session is held by a live node at ``url``: the HTTP layer forwards it."""

    def __init__(self, url: str, node_id: str) -> None:
        super().__init__(url)
        self.url = url
        self.node_id = node_id


@dataclass
class Cluster:
    """This node among the others sharing ``store``: its registry entry and heartbeat, the routing
    of turns, and the copy of droid's session files in the store. ``run()`` beats until cancelled."""

    store: ClusterStore
    node_id: str
    url: str
    secret: str
    sessions_dir: Path
    capacity: int = 0
    heartbeat_s: float = 2.0
    dead_after_s: float = 10.0
    clock: Callable[[], float] = time.time
    started_at: float = field(default_factory=time.time)
    nodes: dict[str, NodeRow] = field(default_factory=dict)
    state: str = "serving"
    store_ok: bool = False
    counters: Counter[str] = field(default_factory=Counter)
    takeover_seconds: float = 0.0  # their count is counters["takeovers"]
    _uploaded: dict[str, dict[str, int]] = field(default_factory=dict)  # session → file → bytes stored

    # --- the registry -------------------------------------------------------------------------

    async def beat(self) -> None:
        try:
            await self.store.heartbeat(NodeRow(self.node_id, self.url, self.capacity, self.started_at, self.clock(),
                                               self.state))
            self.nodes = {n.node_id: n for n in await self.store.nodes()}
            self.store_ok = True
        except Exception as exc:  # noqa: BLE001 - the store is down: keep beating, report it
            if self.store_ok:
                log.error("nodes.heartbeat_failed", error=str(exc))
            self.store_ok = False

    async def run(self) -> None:
        while True:
            await self.beat()
            await anyio.sleep(self.heartbeat_s)

    async def leave(self) -> int:
        """Drained: hand this node's sessions off (their files are stored after every turn) and
        leave the registry. How many sessions were released."""
        self.state = "stopped"
        released = await self.store.release_node(self.node_id)
        await self.store.remove_node(self.node_id)
        log.info("nodes.left", node=self.node_id, sessions_released=released)
        return released

    # --- routing ------------------------------------------------------------------------------

    async def decide(self, holder: str | None) -> Decision:
        decision = route(holder, self.node_id, self.nodes, self.clock(), self.dead_after_s)
        if decision.route == "takeover" and holder is not None:
            await self.beat()  # never take a live node's session on a stale view of it
            decision = route(holder, self.node_id, self.nodes, self.clock(), self.dead_after_s)
        return decision

    async def take_over(self, session_id: str, holder: str | None) -> bool:
        """Make this node the session's holder, with droid's files restored from the store; True
        if files were restored (a worker here that held the session before is then stale)."""
        started = time.monotonic()
        files = await self.store.load_files(session_id)
        restored = False
        if files:
            if not await anyio.to_thread.run_sync(_same_files, self.sessions_dir, session_id, files):
                await anyio.to_thread.run_sync(restore_session_files, self.sessions_dir, files)
                restored = True
            self._remember(session_id, {name: len(data) for name, data in files.items() if name.endswith(GROWING)})
        await self.store.claim(session_id, self.node_id)
        elapsed = time.monotonic() - started
        self.takeover_seconds += elapsed
        self.counters["takeovers"] += 1
        log.info("nodes.takeover", session=session_id, from_node=holder, restored=restored,
                 bytes=sum(len(d) for d in files.values()), ms=round(elapsed * 1000, 1))
        return restored

    async def claim_new(self, session_id: str) -> None:
        await self.store.claim(session_id, self.node_id)

    # --- portable sessions --------------------------------------------------------------------

    async def save(self, session_id: str) -> int:
        """Store what droid appended to the session's files since the last save (whole lines), and
        its small settings file; the bytes stored."""
        files = session_file_paths(self.sessions_dir, session_id)
        known = self._uploaded.get(session_id)
        if known is None:  # first save in this process (a restart keeps its sessions): what is stored
            kept = await self.store.load_files(session_id)
            known = self._remember(session_id, {n: len(d) for n, d in kept.items() if n.endswith(GROWING)})
        appends: list[tuple[str, int, bytes]] = []
        replaces: list[tuple[str, bytes]] = []
        for name, path in files.items():
            if not name.endswith(GROWING):
                replaces.append((name, await anyio.to_thread.run_sync(path.read_bytes)))
                continue
            start = known.get(name, 0)
            size, tail = await anyio.to_thread.run_sync(_read_from, path, start)
            if size < start:  # droid rewrote it shorter: store it whole again
                whole = complete_lines(await anyio.to_thread.run_sync(path.read_bytes))
                replaces.append((name, whole))
                known[name] = len(whole)
                continue
            chunk = complete_lines(tail)
            if chunk:
                appends.append((name, start, chunk))
        await self.store.save_files(session_id, appends, replaces)
        for name, start, chunk in appends:
            known[name] = start + len(chunk)
        stored = sum(len(c) for _, _, c in appends) + sum(len(d) for _, d in replaces)
        self.counters["files_saved_bytes"] += stored
        return stored

    def forget(self, session_id: str) -> None:
        self._uploaded.pop(session_id, None)

    async def keep_files(self, session_id: str) -> None:
        """After a turn: droid's files of the session go to the store; a failure is counted and
        logged (the turn stands; another node may lack it)."""
        try:
            await self.save(session_id)
        except Exception as exc:  # noqa: BLE001 - the turn stands; another node may lack it
            self.counters["files_save_failed"] += 1
            log.error("nodes.files_save_failed", session=session_id, error=str(exc))

    def _remember(self, session_id: str, sizes: dict[str, int]) -> dict[str, int]:
        if len(self._uploaded) >= MAX_TRACKED and session_id not in self._uploaded:
            self._uploaded.pop(next(iter(self._uploaded)))  # the oldest: re-read from the store if needed
        self._uploaded[session_id] = sizes
        return sizes


def _read_from(path: Path, start: int) -> tuple[int, bytes]:
    """The file's size, and its bytes from ``start`` on (nothing when it is shorter)."""
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < start:
            return size, b""
        handle.seek(start)
        return size, handle.read()


def _same_files(sessions_dir: Path, session_id: str, files: Mapping[str, bytes]) -> bool:
    local = session_file_paths(sessions_dir, session_id)
    return all(name in local and local[name].stat().st_size == len(data) and local[name].read_bytes() == data
               for name, data in files.items())


# --- where a turn runs ------------------------------------------------------------------------


async def forward_early(cluster: Cluster, sessions: Sessions, request: TurnRequest, access: Access) -> None:
    """A session another live node holds: ``Forward`` at once, before any lock or budget check here
    (the holder does them). A race with a move is settled by ``place``, under the lock."""
    record = await sessions.peek(request, conversation.seed(request.system, namespace=access.owner), access)
    if record is None or record.node_id in (None, cluster.node_id) or record.owner != access.owner:
        return
    decision = route(record.node_id, cluster.node_id, cluster.nodes, cluster.clock(), cluster.dead_after_s)
    if decision.route == "forward":
        assert decision.url is not None and decision.holder is not None
        cluster.counters["forwards"] += 1
        raise Forward(decision.url, decision.holder)


async def place(cluster: Cluster, sessions: Sessions, record: SessionRecord, local: bool) -> None:
    """Under the session's lock: run here, forward to the node holding the session (``Forward``),
    or take it over (its files restored here; a worker here with an older copy lets it go)."""
    decision = await cluster.decide(record.node_id)
    if decision.route == "forward" and not local:
        assert decision.url is not None and decision.holder is not None
        cluster.counters["forwards"] += 1
        raise Forward(decision.url, decision.holder)
    moved = decision.route != "local" or record.node_id != cluster.node_id
    if moved and await cluster.take_over(record.session_id, record.node_id):
        sessions.pool.forget_session(record.session_id)
