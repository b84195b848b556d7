"""The pool's decisions as pure functions over plain state: assignment and reconciliation.

How new conversations get a clean droid (``SessionMode``):

- ``minted``: any idle droid process starts a new conversation by loading a session droidpool
  wrote (``droid/sessions.py``), in ~50 ms. The processes are a pure compute pool: a follow-up
  goes to the worker holding its session, else to any available one; a new conversation to
  any available one. A spawn only grows the pool.
- ``fresh``: droid's format is not the one droidpool knows (the start-up self-test failed, or
  it has not run yet), so a new conversation needs a process that has never held one (a
  spare, initialized with ``droid.initialize_session``); a used process serves follow-ups only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from droidpool.config import PoolConfig
from droidpool.droid.worker import SessionSettings, WorkerState

MB = 1024 * 1024
# What a new worker is assumed to need before it has been measured (droid idles at ~180 MB).
DEFAULT_WORKER_RSS = 200 * MB
# A spare is not retired for being surplus before it is this old, so demand can't make it thrash.
SPARE_MIN_LIFE_S = 60.0
# After a worker is handed to a request, the reserve is not topped up for this long (unless a
# request waits): a droid starting at the same time takes the CPU from that turn's first token.
# A request that finds nothing available still spawns for itself.
GROWTH_DEFER_S = 0.5
# fresh mode, at the cap: an idle session worker used more recently than this keeps its place;
# its conversation's next turn is likely close. (A new conversation may still evict it.)
RECENTLY_USED_S = 5.0

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


# --- reconciliation: what the supervisor does between requests --------------------------------


@dataclass(frozen=True, slots=True)
class Stop:
    worker_id: int
    reason: StopReason


@dataclass(frozen=True, slots=True)
class Plan:
    start: int = 0  # workers to spawn now
    stop: tuple[Stop, ...] = ()


def reserve_target(policy: PoolPolicy, peak: int, busy: int) -> int:
    """How many workers to keep available: what the recent peak of concurrent requests would
    need beyond those running now, at least ``idle_min`` and at most ``idle_max``."""
    return max(policy.idle_min, min(policy.idle_max, peak - busy))


def reconcile(
    workers: Sequence[WorkerView],
    policy: PoolPolicy,
    now: float,
    *,
    mode: SessionMode = "minted",
    peak: int = 0,
    in_flight: int = 0,
    reserved: int = 0,
    defer_growth: bool = False,
) -> Plan:
    """Recycle, shrink and top up the pool so every bound holds.

    ``peak`` is the most requests that were running or waiting at once lately. The reserve
    is the workers available to a new request: in minted mode spares and idle session workers
    alike, in fresh mode spares only. Order: recycle worn idle workers (turns, RSS) and old
    spares; stop available workers above ``idle_min`` unused for ``idle_ttl_s`` (least recently
    used first); over the memory budget, stop idle session workers, then spares above
    ``idle_min``; finally start workers until the reserve meets its target, within the cap, the
    spawn throttle and the memory budget, and not while ``defer_growth`` (a turn is just
    starting). In fresh mode, at the cap, idle session workers not used lately give way to the
    spares new conversations need.
    """
    live = [w for w in workers if w.state not in (WorkerState.DEAD, WorkerState.STOPPING)]
    stopping = sum(1 for w in workers if w.state is WorkerState.STOPPING)
    stops: dict[int, Stop] = {}

    def stop(worker: WorkerView, reason: StopReason) -> None:
        stops.setdefault(worker.id, Stop(worker.id, reason))

    for w in live:
        if w.state is WorkerState.IDLE:
            if policy.max_turns and w.turns >= policy.max_turns:
                stop(w, "recycle_turns")
            elif policy.max_worker_rss and w.rss >= policy.max_worker_rss:
                stop(w, "recycle_rss")
        elif w.state is WorkerState.READY and policy.spare_max_age_s and now - w.created_at >= policy.spare_max_age_s:
            stop(w, "spare_age")

    def kept() -> list[WorkerView]:
        return [w for w in live if w.id not in stops]

    def reserve() -> list[WorkerView]:
        counted = (WorkerState.READY, WorkerState.IDLE) if mode == "minted" else (WorkerState.READY,)
        return [w for w in kept() if w.state in counted]

    if policy.idle_ttl_s:
        # Available workers unused this long go, least recently used first, but the
        # ``idle_min`` most recently used members of the reserve stay.
        members = {w.id for w in reserve()}
        stale = sorted((w for w in kept() if w.available and now - w.last_used >= policy.idle_ttl_s),
                       key=lambda w: w.last_used, reverse=True)
        kept_reserve = sum(1 for w in reserve() if w not in stale)
        for w in stale:
            if w.state is WorkerState.READY and now - w.created_at < SPARE_MIN_LIFE_S:
                continue
            if w.id in members and kept_reserve < policy.idle_min:
                kept_reserve += 1
                continue
            stop(w, "idle_ttl")

    total = sum(w.rss for w in kept())
    if policy.memory_budget and total > policy.memory_budget:
        idle = sorted((w for w in kept() if w.state is WorkerState.IDLE), key=lambda w: w.last_used)
        spares = sorted((w for w in kept() if w.state is WorkerState.READY), key=lambda w: w.created_at)
        for w in [*idle, *spares[policy.idle_min:]]:
            if total <= policy.memory_budget:
                break
            stop(w, "memory")
            total -= w.rss

    busy = sum(1 for w in kept() if w.state is WorkerState.BUSY)
    starting = sum(1 for w in kept() if w.state is WorkerState.STARTING)
    target = reserve_target(policy, peak, busy)
    missing = max(0, target - len(reserve()) - starting)
    below_floor = max(0, policy.idle_min - len(reserve()) - starting)
    # Processes being stopped still count against the cap until they are dead.
    room = policy.max_workers - reserved - len(live) - stopping
    spawn_room = policy.max_concurrent_spawns - in_flight
    measured = [w.rss for w in kept() if w.rss]
    per_worker = sorted(measured)[len(measured) // 2] if measured else DEFAULT_WORKER_RSS
    memory_room = (math.floor((policy.memory_budget - total) / per_worker) if policy.memory_budget
                   else policy.max_workers)
    # The minimum reserve always starts (the operator's reservation); growth with demand only
    # as far as the memory budget allows.
    wanted = below_floor + min(missing - below_floor, max(0, memory_room - below_floor))
    if mode == "fresh" and wanted > room:
        idle = sorted(
            (w for w in kept() if w.state is WorkerState.IDLE and now - w.last_used >= RECENTLY_USED_S),
            key=lambda w: w.last_used,
        )
        for w in idle[: wanted - max(0, room)]:
            stop(w, "room_for_spare")
    if defer_growth:
        return Plan(0, tuple(stops.values()))
    return Plan(max(0, min(wanted, room, spawn_room)), tuple(stops.values()))
