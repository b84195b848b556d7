"""The pool's decisions as pure functions over plain state: assignment and reconciliation."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from droidpool.config import ModelSpec, PoolConfig
from droidpool.droid.worker import SessionSettings, WorkerState

MB = 1024 * 1024
# What a new worker is assumed to need before it has been measured (droid idles at ~180 MB).
DEFAULT_WORKER_RSS = 200 * MB
# Surplus spares (above demand) are kept at least this long, so demand can't make them thrash.
SPARE_MIN_LIFE_S = 60.0
# An idle session worker used more recently than this is not evicted just to pre-warm a spare:
# its conversation's next turn is likely close. (A new conversation may still evict it at the cap.)
RECENTLY_USED_S = 5.0


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


@dataclass(frozen=True)
class PoolPolicy:
    """The limits the pool enforces; built from [pool] config and replaced on reload."""

    max_workers: int = 4
    models: tuple[ModelSpec, ...] = ()
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
    def from_config(cls, pool: PoolConfig) -> PoolPolicy:
        return cls(
            max_workers=pool.max_workers,
            models=pool.models,
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

    def specs(self) -> tuple[ModelSpec, ...]:
        """The models to keep warm; "" stands for droid's default model."""
        return self.models or (ModelSpec(""),)


# --- assignment: which worker serves a request ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Want:
    """What a request needs: to continue ``session_id``, or a new session with ``settings``."""

    settings: SessionSettings
    session_id: str | None = None


@dataclass(frozen=True, slots=True)
class Assignment:
    """``take`` a worker, or ``spawn`` one (optionally after ``evict``ing one), or ``wait``."""

    action: str  # "take" | "spawn" | "wait"
    worker_id: int | None = None
    evict_id: int | None = None


def assign(workers: Sequence[WorkerView], want: Want, max_workers: int) -> Assignment:
    """Choose a worker for a request; never exceeds ``max_workers`` live processes.

    Continuing a session: the worker that holds it; else load it into the least recently
    used idle worker, else a spare, else a new process. A new session: a spare with the same
    settings, else any spare (re-initialized: it has run no turn), else a new process.
    At the cap, the least recently used idle session worker is evicted to make room.
    """
    live = [w for w in workers if w.state is not WorkerState.DEAD]
    idle = sorted((w for w in live if w.state is WorkerState.IDLE), key=lambda w: w.last_used)
    spares = [w for w in live if w.state is WorkerState.READY]
    if want.session_id is not None:
        for w in idle:
            if w.session_id == want.session_id:
                return Assignment("take", w.id)
        if idle:
            return Assignment("take", idle[0].id)
    if spares:
        return Assignment("take", _best_spare(spares, want.settings).id)
    if len(live) < max_workers:
        return Assignment("spawn")
    if idle:
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
    reason: str  # recycle_turns | recycle_rss | idle_ttl | spare_age | spare_surplus | memory | room_for_spare


@dataclass(frozen=True, slots=True)
class Plan:
    start: tuple[str, ...] = ()  # model ids (spec ids) of spares to spawn now
    stop: tuple[Stop, ...] = ()


def spare_targets(specs: Sequence[ModelSpec], demand: Mapping[str, int]) -> dict[str, int]:
    """Spares per model: the recent count of new conversations, clamped to [spares, max_spares]."""
    return {s.id: min(s.max_spares, max(s.spares, demand.get(s.id, 0))) for s in specs}


def reconcile(
    workers: Sequence[WorkerView],
    policy: PoolPolicy,
    now: float,
    *,
    demand: Mapping[str, int] | None = None,
    in_flight: int = 0,
    reserved: int = 0,
) -> Plan:
    """Recycle, evict and top up spares so every bound holds.

    Order: recycle worn idle workers (turns, RSS, idle time) and old spares; shed spares
    above demand; if the workers' RSS is over the memory budget, evict idle session workers
    (least recently used first), then surplus spares; finally start the spares each model
    lacks, as far as the process cap, the spawn throttle and the memory budget allow — at the
    cap, an idle session worker is evicted to make room (its session reloads on its next turn).
    """
    live = [w for w in workers if w.state not in (WorkerState.DEAD, WorkerState.STOPPING)]
    stopping = sum(1 for w in workers if w.state is WorkerState.STOPPING)
    stops: dict[int, Stop] = {}

    def stop(worker: WorkerView, reason: str) -> None:
        stops.setdefault(worker.id, Stop(worker.id, reason))

    for w in live:
        if w.state is WorkerState.IDLE:
            if policy.max_turns and w.turns >= policy.max_turns:
                stop(w, "recycle_turns")
            elif policy.max_worker_rss and w.rss >= policy.max_worker_rss:
                stop(w, "recycle_rss")
            elif policy.idle_ttl_s and now - w.last_used >= policy.idle_ttl_s:
                stop(w, "idle_ttl")
        elif w.state is WorkerState.READY and policy.spare_max_age_s and now - w.created_at >= policy.spare_max_age_s:
            stop(w, "spare_age")

    specs = policy.specs()
    targets = spare_targets(specs, demand or {})
    floors = {s.id: s.spares for s in specs}

    def spares_of(model: str) -> list[WorkerView]:
        return sorted(
            (w for w in live if w.state is WorkerState.READY and (w.model_id or "") == model and w.id not in stops),
            key=lambda w: w.created_at,
        )

    surplus: list[WorkerView] = []  # spares above their model's floor, oldest first
    for w in live:
        if w.state is WorkerState.READY and (w.model_id or "") not in targets and w.id not in stops:
            stop(w, "spare_surplus")  # its model is no longer configured
    for model, target in targets.items():
        spares = spares_of(model)
        for w in spares[: max(0, len(spares) - target)]:
            if now - w.created_at >= SPARE_MIN_LIFE_S:
                stop(w, "spare_surplus")
        surplus.extend(spares_of(model)[: max(0, len(spares_of(model)) - floors[model])])

    def kept() -> list[WorkerView]:
        return [w for w in live if w.id not in stops]

    total = sum(w.rss for w in kept())
    if policy.memory_budget and total > policy.memory_budget:
        idle = sorted((w for w in kept() if w.state is WorkerState.IDLE), key=lambda w: w.last_used)
        for w in [*idle, *surplus]:
            if total <= policy.memory_budget:
                break
            if w.id in stops:
                continue
            stop(w, "memory")
            total -= w.rss

    # Processes being stopped still count against the cap until they are dead.
    room = policy.max_workers - reserved - len(live) - stopping
    spawn_room = policy.max_concurrent_spawns - in_flight
    measured = [w.rss for w in kept() if w.rss]
    per_worker = sorted(measured)[len(measured) // 2] if measured else DEFAULT_WORKER_RSS
    memory_room = (
        math.floor((policy.memory_budget - total) / per_worker) if policy.memory_budget else len(workers) + policy.max_workers
    )
    # The configured minimum spares always start (the operator's reservation, never evicted
    # for memory); spares above it, for demand, only as far as the memory budget allows.
    floor_wanted: list[str] = []
    demand_wanted: list[str] = []
    for model, target in targets.items():
        have = sum(
            1 for w in kept()
            if (w.model_id or "") == model and w.state in (WorkerState.READY, WorkerState.STARTING)
        )
        missing = max(0, target - have)
        below_floor = min(missing, max(0, floors[model] - have))
        floor_wanted.extend([model] * below_floor)
        demand_wanted.extend([model] * (missing - below_floor))
    wanted = floor_wanted + demand_wanted[: max(0, memory_room - len(floor_wanted))]
    if len(wanted) > room:
        # At the cap: idle session workers not used lately give way to the spares new
        # conversations need.
        idle = sorted(
            (w for w in kept() if w.state is WorkerState.IDLE and now - w.last_used >= RECENTLY_USED_S),
            key=lambda w: w.last_used,
        )
        for w in idle[: len(wanted) - max(0, room)]:
            stop(w, "room_for_spare")
    starts = wanted[: max(0, min(room, spawn_room))]
    return Plan(tuple(starts), tuple(stops.values()))
