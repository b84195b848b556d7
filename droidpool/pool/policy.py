"""The pool's limits, its workers as plain views, and which worker serves a request (``assign``).

How new conversations get a clean droid (``SessionMode``):

- ``minted``: any idle droid process starts a new conversation by loading a session droidpool
  wrote (``droid/minted.py``), in ~50 ms. The processes are a pure compute pool: a follow-up
  goes to the worker holding its session, else to any available one; a new conversation to
  any available one. A spawn only grows the pool.
- ``fresh``: droid's format is not the one droidpool knows (the start-up self-test failed, or
  it has not run yet), so a new conversation needs a process that has never held one (a
  spare, initialized with ``droid.initialize_session``); a used process serves follow-ups only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from droidpool.config import PoolConfig
from droidpool.droid.spec import SessionSettings
from droidpool.droid.worker import WorkerState

MB = 1024 * 1024

SessionMode = Literal["minted", "fresh"]
StopReason = Literal[
    "recycle_turns", "recycle_rss", "idle_ttl", "spare_age", "memory", "room_for_spare", "reconfigured",
    "stale_session",
]


@dataclass(frozen=True, slots=True)
class WorkerView:
    id: int
    state: WorkerState
    model_id: str | None
    session_id: str | None
    last_used: float
    settings: SessionSettings | None = None
    turns: int = 0
    created_at: float = 0.0
    rss: int = 0

    @property
    def available(self) -> bool:
        """Can take a request now: a spare (READY) or an idle session worker (IDLE)."""
        return self.state in (WorkerState.READY, WorkerState.IDLE)


@dataclass(frozen=True)
class PoolPolicy:
    """The limits the pool enforces; built from [pool] config and replaced on reload."""

    max_workers: int = 4
    idle_min: int = 1
    idle_max: int = 4
    queue_size: int = 32
    queue_timeout_s: float = 30.0
    spawn_timeout_s: float = 20.0
    memory_budget: int = 0  # bytes; 0 = none
    max_worker_rss: int = 0  # bytes; 0 = never recycle for memory
    max_turns: int = 0  # 0 = never recycle for turns
    spare_max_age_s: float = 0.0
    idle_ttl_s: float = 0.0
    max_concurrent_spawns: int = 2

    @classmethod
    def from_config(cls, pool: PoolConfig, max_workers: int | None = None) -> PoolPolicy:
        return cls(
            max_workers=max_workers or pool.max_workers,
            idle_min=pool.idle_min,
            idle_max=max(pool.idle_min, pool.idle_max),
            queue_size=pool.queue_size,
            queue_timeout_s=pool.queue_timeout_s,
            spawn_timeout_s=pool.spawn_timeout_s,
            memory_budget=pool.memory_budget_mb * MB,
            max_worker_rss=pool.max_worker_rss_mb * MB,
            max_turns=pool.max_turns_per_worker,
            spare_max_age_s=pool.spare_max_age_s,
            idle_ttl_s=pool.idle_worker_ttl_s,
            max_concurrent_spawns=pool.max_concurrent_spawns,
        )


def auto_max_workers(available_bytes: int, per_worker: int = 300 * MB, low: int = 2, high: int = 16) -> int:
    """The process cap for ``pool.max_workers = 0``: half the memory available at start-up,
    ``per_worker`` each (droid idles at ~180 MB and grows to ~300 MB over many turns)."""
    return max(low, min(high, available_bytes // 2 // per_worker))


# --- assignment: which worker serves a request ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Want:
    """What a request needs: to continue ``session_id``, or a new session with ``settings``;
    and the MCP servers droid must have for it (``mcp_reset`` replaces a worker's servers when
    the session has none: droid keeps old servers when given an empty list)."""

    settings: SessionSettings
    session_id: str | None = None
    mcp_servers: tuple[dict[str, Any], ...] = ()
    mcp_reset: tuple[dict[str, Any], ...] = ()

    def servers_for(self, current: Sequence[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """What to give ``load_session`` for a worker that has ``current``: None, nothing."""
        if self.mcp_servers:
            return list(self.mcp_servers)
        if current and list(current) != list(self.mcp_reset):
            return list(self.mcp_reset)
        return None


@dataclass(frozen=True, slots=True)
class Assignment:
    """``take`` a worker, or ``spawn`` one (optionally after ``evict``ing one), or ``wait``."""

    action: Literal["take", "spawn", "wait"]
    worker_id: int | None = None
    evict_id: int | None = None


def assign(workers: Sequence[WorkerView], want: Want, max_workers: int, mode: SessionMode = "minted") -> Assignment:
    """Choose a worker for a request; never exceeds ``max_workers`` live processes.

    A follow-up takes the idle worker holding its session; else a spare (it displaces no warm
    session), else the least recently used idle worker, which loads the session. A new
    conversation takes a spare, else (minted mode) the least recently used idle worker. Only
    when nothing is available is a process spawned, within the cap; in fresh mode, at the cap,
    the least recently used idle session worker is evicted to make room for a new conversation.
    """
    live = [w for w in workers if w.state is not WorkerState.DEAD]
    idle = sorted((w for w in live if w.state is WorkerState.IDLE), key=lambda w: w.last_used)
    spares = [w for w in live if w.state is WorkerState.READY]
    if want.session_id is not None:
        for w in idle:
            if w.session_id == want.session_id:
                return Assignment("take", w.id)
        if mode == "fresh" and idle:  # keep the spares for new conversations
            return Assignment("take", idle[0].id)
        if spares:
            return Assignment("take", spares[0].id)
        if idle:
            return Assignment("take", idle[0].id)
    else:
        if spares:
            return Assignment("take", _best_spare(spares, want.settings).id)
        if mode == "minted" and idle:
            return Assignment("take", idle[0].id)
    if len(live) < max_workers:
        return Assignment("spawn")
    if mode == "fresh" and want.session_id is None and idle:
        return Assignment("spawn", evict_id=idle[0].id)
    return Assignment("wait")


def _best_spare(spares: Sequence[WorkerView], settings: SessionSettings) -> WorkerView:
    for w in spares:
        if w.settings == settings:
            return w
    for w in spares:
        if w.model_id == settings.model_id:
            return w
    return spares[0]
