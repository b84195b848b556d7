"""The supervisor's decision as pure steps over a snapshot: recycle, expire idle, fit memory, grow.

``reconcile`` runs the four steps in order; each sees only the workers the steps before it
kept, and returns the workers it stops (``grow`` also how many to start). None does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from droidpool.droid.worker import WorkerState

from .policy import MB, PoolPolicy, SessionMode, StopReason, WorkerView

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


def reserve(workers: Sequence[WorkerView], mode: SessionMode) -> list[WorkerView]:
    """The workers available to a new request: in minted mode spares and idle session workers
    alike, in fresh mode spares only."""
    counted = (WorkerState.READY, WorkerState.IDLE) if mode == "minted" else (WorkerState.READY,)
    return [w for w in workers if w.state in counted]


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

    ``peak`` is the most requests that were running or waiting at once lately; ``in_flight``
    the spawns under way; ``reserved`` the slots promised to a spawn that waits for an
    eviction. Stopping workers still count against the cap until they are dead.
    """
    live = [w for w in workers if w.state not in (WorkerState.DEAD, WorkerState.STOPPING)]
    stopping = sum(1 for w in workers if w.state is WorkerState.STOPPING)
    recycled = recycle(live, policy, now)
    kept = _without(live, recycled)
    expired = expire_idle(kept, policy, now, mode)
    kept = _without(kept, expired)
    evicted = fit_memory(kept, policy)
    kept = _without(kept, evicted)
    growth = grow(kept, policy, now, mode=mode, peak=peak, in_flight=in_flight,
                  occupied=len(live) + stopping + reserved, defer_growth=defer_growth)
    return Plan(growth.start, (*recycled, *expired, *evicted, *growth.stop))


def recycle(live: Sequence[WorkerView], policy: PoolPolicy, now: float) -> tuple[Stop, ...]:
    """Worn idle workers (``max_turns`` turns run, or ``max_worker_rss`` grown) and spares older
    than ``spare_max_age_s``. A busy worker is recycled once it is idle again."""
    stops: list[Stop] = []
    for w in live:
        if w.state is WorkerState.IDLE:
            if policy.max_turns and w.turns >= policy.max_turns:
                stops.append(Stop(w.id, "recycle_turns"))
            elif policy.max_worker_rss and w.rss >= policy.max_worker_rss:
                stops.append(Stop(w.id, "recycle_rss"))
        elif w.state is WorkerState.READY and policy.spare_max_age_s \
                and now - w.created_at >= policy.spare_max_age_s:
            stops.append(Stop(w.id, "spare_age"))
    return tuple(stops)


def expire_idle(
    kept: Sequence[WorkerView], policy: PoolPolicy, now: float, mode: SessionMode
) -> tuple[Stop, ...]:
    """Available workers unused for ``idle_ttl_s``, least recently used first; the ``idle_min``
    most recently used members of the reserve stay, and so does a spare younger than
    ``SPARE_MIN_LIFE_S``."""
    if not policy.idle_ttl_s:
        return ()
    members = {w.id for w in reserve(kept, mode)}
    stale = sorted((w for w in kept if w.available and now - w.last_used >= policy.idle_ttl_s),
                   key=lambda w: w.last_used, reverse=True)
    kept_reserve = len(members) - sum(1 for w in stale if w.id in members)
    stops: list[Stop] = []
    for w in stale:
        if w.state is WorkerState.READY and now - w.created_at < SPARE_MIN_LIFE_S:
            continue
        if w.id in members and kept_reserve < policy.idle_min:
            kept_reserve += 1
            continue
        stops.append(Stop(w.id, "idle_ttl"))
    return tuple(stops)


def fit_memory(kept: Sequence[WorkerView], policy: PoolPolicy) -> tuple[Stop, ...]:
    """Over ``memory_budget``: idle session workers go, least recently used first, then spares
    above ``idle_min``, oldest first, until the workers' resident memory fits."""
    total = sum(w.rss for w in kept)
    if not policy.memory_budget or total <= policy.memory_budget:
        return ()
    idle = sorted((w for w in kept if w.state is WorkerState.IDLE), key=lambda w: w.last_used)
    spares = sorted((w for w in kept if w.state is WorkerState.READY), key=lambda w: w.created_at)
    stops: list[Stop] = []
    for w in [*idle, *spares[policy.idle_min:]]:
        if total <= policy.memory_budget:
            break
        stops.append(Stop(w.id, "memory"))
        total -= w.rss
    return tuple(stops)


def grow(
    kept: Sequence[WorkerView],
    policy: PoolPolicy,
    now: float,
    *,
    mode: SessionMode,
    peak: int,
    in_flight: int,
    occupied: int,
    defer_growth: bool = False,
) -> Plan:
    """Start workers until the reserve meets its target (``reserve_target``), within the cap
    (``occupied`` processes already count against it), the spawn throttle and the memory
    budget, and not while ``defer_growth`` (a turn is just starting). The ``idle_min`` floor
    always starts; growth with demand only as far as the memory budget allows. In fresh mode,
    at the cap, idle session workers not used lately give way to the spares new conversations
    need."""
    available = reserve(kept, mode)
    busy = sum(1 for w in kept if w.state is WorkerState.BUSY)
    starting = sum(1 for w in kept if w.state is WorkerState.STARTING)
    missing = max(0, reserve_target(policy, peak, busy) - len(available) - starting)
    below_floor = max(0, policy.idle_min - len(available) - starting)
    room = policy.max_workers - occupied
    spawn_room = policy.max_concurrent_spawns - in_flight
    total = sum(w.rss for w in kept)
    measured = [w.rss for w in kept if w.rss]
    per_worker = sorted(measured)[len(measured) // 2] if measured else DEFAULT_WORKER_RSS
    memory_room = (math.floor((policy.memory_budget - total) / per_worker) if policy.memory_budget
                   else policy.max_workers)
    wanted = below_floor + min(missing - below_floor, max(0, memory_room - below_floor))
    stops: tuple[Stop, ...] = ()
    if mode == "fresh" and wanted > room:
        idle = sorted(
            (w for w in kept if w.state is WorkerState.IDLE and now - w.last_used >= RECENTLY_USED_S),
            key=lambda w: w.last_used,
        )
        stops = tuple(Stop(w.id, "room_for_spare") for w in idle[: wanted - max(0, room)])
    if defer_growth:
        return Plan(0, stops)
    return Plan(max(0, min(wanted, room, spawn_room)), stops)


def _without(workers: Sequence[WorkerView], stops: Sequence[Stop]) -> list[WorkerView]:
    stopped = {s.worker_id for s in stops}
    return [w for w in workers if w.id not in stopped]
