"""The pool's decisions as pure functions over plain state: no processes needed."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from droidpool.droid.worker import SessionSettings, WorkerState
from droidpool.pool.policy import (
    MB,
    PoolPolicy,
    SessionMode,
    Want,
    WorkerView,
    assign,
    auto_max_workers,
)
from droidpool.pool.reconcile import (
    DEFAULT_WORKER_RSS,
    RECENTLY_USED_S,
    SPARE_MIN_LIFE_S,
    expire_idle,
    fit_memory,
    grow,
    reconcile,
    recycle,
    reserve,
    reserve_target,
)

S = SessionSettings(model_id="m")
R, I, B, ST, D, SP = (WorkerState.READY, WorkerState.IDLE, WorkerState.BUSY, WorkerState.STARTING, WorkerState.DEAD,
                      WorkerState.STOPPING)
NOW = 10_000.0


def view(i: int, state: WorkerState, session: str | None = None, used: float = 0.0, model: str | None = "m",
         settings: SessionSettings | None = None, turns: int = 0, created: float = 0.0, rss: int = 0) -> WorkerView:
    return WorkerView(i, state, model, session, used, settings, turns, created, rss)


def policy(**kw: object) -> PoolPolicy:
    base: dict[str, object] = {"max_workers": 4, "idle_min": 1, "idle_max": 4}
    return PoolPolicy(**{**base, **kw})  # type: ignore[arg-type]


# --- assignment: minted mode ---------------------------------------------------------------------


def test_follow_up_goes_to_the_worker_holding_its_session() -> None:
    workers = [view(1, I, "a", 1), view(2, I, "b", 0), view(3, R)]
    assert assign(workers, Want(S, "b"), 4).worker_id == 2


def test_an_evicted_session_loads_into_a_spare_first_then_the_lru_idle_worker() -> None:
    workers = [view(1, I, "a", 5), view(2, I, "b", 1), view(3, R)]
    assert assign(workers, Want(S, "z"), 4).worker_id == 3  # a spare displaces no warm session
    assert assign(workers[:2], Want(S, "z"), 4).worker_id == 2


def test_a_new_conversation_takes_any_available_worker_and_never_spawns_while_one_is_idle() -> None:
    other = SessionSettings(model_id="x")
    assert assign([view(1, R, settings=other, model="x"), view(2, R, settings=S)], Want(S), 4).worker_id == 2
    assert assign([view(1, I, "a", 9), view(2, I, "b", 3)], Want(S), 4).worker_id == 2  # LRU idle
    assert assign([view(1, I, "a"), view(2, B, "b")], Want(S), 2).action == "take"


def test_only_when_nothing_is_available_a_worker_is_spawned_within_the_cap() -> None:
    assert assign([view(1, B, "a")], Want(S), 2).action == "spawn"
    workers = [view(1, B, "a"), view(2, ST)]
    assert assign(workers, Want(S), 2).action == "wait"
    assert assign(workers, Want(S, "a"), 2).action == "wait"


# --- assignment: fresh mode (the fallback) -------------------------------------------------------


def test_fresh_mode_never_gives_a_used_worker_a_new_conversation() -> None:
    assert assign([view(1, I, "a")], Want(S), 4, "fresh").action == "spawn"
    assert assign([view(1, I, "a"), view(2, R)], Want(S), 4, "fresh").worker_id == 2


def test_fresh_mode_keeps_spares_for_new_conversations() -> None:
    workers = [view(1, I, "a", 5), view(2, I, "b", 1), view(3, R)]
    assert assign(workers, Want(S, "z"), 4, "fresh").worker_id == 2


def test_fresh_mode_at_the_cap_evicts_the_lru_idle_worker_for_a_new_conversation() -> None:
    workers = [view(1, I, "a", 9), view(2, I, "b", 3), view(3, B, "c")]
    decision = assign(workers, Want(S), 3, "fresh")
    assert (decision.action, decision.evict_id) == ("spawn", 2)


# --- reconciliation ----------------------------------------------------------------------------


def test_the_reserve_follows_the_recent_peak_between_idle_min_and_idle_max() -> None:
    p = policy(idle_min=1, idle_max=4)
    assert reserve_target(p, peak=0, busy=0) == 1
    assert reserve_target(p, peak=3, busy=0) == 3
    assert reserve_target(p, peak=3, busy=3) == 1
    assert reserve_target(p, peak=9, busy=1) == 4


def test_workers_start_until_the_reserve_is_met_within_cap_and_throttle() -> None:
    p = policy(max_concurrent_spawns=2)
    assert reconcile([], p, NOW).start == 1
    assert reconcile([], p, NOW, peak=3).start == 2  # throttled
    assert reconcile([view(1, ST)], p, NOW, peak=3).start == 2
    assert reconcile([], p, NOW, peak=3, in_flight=2).start == 0
    assert reconcile([view(1, B, "a")], p, NOW, peak=1).start == 1  # the idle minimum, beyond the running one


def test_in_minted_mode_idle_session_workers_count_as_the_reserve() -> None:
    workers = [view(1, I, "a", used=NOW), view(2, B, "b")]
    assert reconcile(workers, policy(), NOW).start == 0
    assert reconcile(workers, policy(), NOW, mode="fresh").start == 1  # fresh mode: spares only


def test_fresh_mode_at_the_cap_an_idle_session_worker_gives_way_to_a_spare() -> None:
    workers = [view(1, I, "a", used=NOW - 100), view(2, I, "b", used=NOW - 200), view(3, B, "c"), view(4, B, "d")]
    plan = reconcile(workers, policy(), NOW, mode="fresh")
    assert plan.start == 0  # the victim still counts until it is dead
    assert [(s.worker_id, s.reason) for s in plan.stop] == [(2, "room_for_spare")]
    after = [w for w in workers if w.id != 2]
    assert reconcile(after, policy(), NOW, mode="fresh").start == 1
    recent = [view(1, I, "a", used=NOW - RECENTLY_USED_S + 1), view(2, B, "c"), view(3, B, "d"), view(4, B, "e")]
    assert reconcile(recent, policy(), NOW, mode="fresh").stop == ()
    assert reconcile(workers, policy(), NOW).stop == ()  # minted mode never needs that


def test_worn_idle_workers_and_old_spares_are_recycled() -> None:
    p = policy(max_turns=100, max_worker_rss=400 * MB, spare_max_age_s=3600)
    workers = [
        view(1, I, "a", used=NOW, turns=100),
        view(2, I, "b", used=NOW, rss=450 * MB),
        view(4, R, created=NOW - 4000),
        view(5, B, "e", turns=500, rss=900 * MB),  # busy: never touched
    ]
    reasons = {s.worker_id: s.reason for s in reconcile(workers, p, NOW).stop}
    assert reasons == {1: "recycle_turns", 2: "recycle_rss", 4: "spare_age"}


def test_available_workers_unused_for_the_ttl_go_but_idle_min_stays() -> None:
    p = policy(idle_min=1, idle_ttl_s=600)
    workers = [view(1, I, "a", used=NOW - 700), view(2, I, "b", used=NOW - 900), view(3, R, used=NOW - 800)]
    stops = {s.worker_id: s.reason for s in reconcile(workers, p, NOW).stop}
    assert stops == {2: "idle_ttl", 3: "idle_ttl"}  # the most recently used one stays
    fresh_spare = [view(1, R, used=NOW - 700, created=NOW - SPARE_MIN_LIFE_S + 1), view(2, R, used=NOW - 700)]
    assert {s.worker_id for s in reconcile(fresh_spare, policy(idle_min=0, idle_ttl_s=600), NOW).stop} == {2}
    assert reconcile([view(1, I, "a", used=NOW - 10)], p, NOW).stop == ()


def test_over_the_memory_budget_lru_idle_go_first_then_spares_above_idle_min() -> None:
    p = policy(memory_budget=1000 * MB)
    workers = [
        view(1, I, "a", used=50, rss=300 * MB),
        view(2, I, "b", used=10, rss=300 * MB),
        view(3, R, created=1, rss=200 * MB),
        view(4, R, created=2, rss=200 * MB),
        view(5, B, "c", rss=300 * MB),
    ]
    assert [(s.worker_id, s.reason) for s in reconcile(workers, p, NOW).stop] == [(2, "memory")]  # 1300 → 1000
    tighter = reconcile(workers, policy(memory_budget=500 * MB), NOW)
    assert [s.worker_id for s in tighter.stop] == [2, 1, 4]  # LRU idle, then the spare above idle_min
    assert tighter.start == 0


def test_the_minimum_starts_before_memory_is_measured_but_growth_is_budgeted() -> None:
    p = policy(memory_budget=300 * MB, max_concurrent_spawns=4)
    assert reconcile([], p, NOW, peak=3).start == 1  # 1 floor; no room for 2 more at 200 MB
    assert reconcile([], policy(memory_budget=2000 * MB, max_concurrent_spawns=4), NOW, peak=3).start == 3


def test_the_automatic_cap_takes_half_the_memory_at_300_mb_a_worker() -> None:
    assert auto_max_workers(24 * 1024 * MB) == 16
    assert auto_max_workers(3 * 1024 * MB) == 5
    assert auto_max_workers(256 * MB) == 2


# --- properties --------------------------------------------------------------------------------

states = st.sampled_from(list(WorkerState))
worker_views = st.lists(
    st.builds(view, st.integers(0, 50), states, st.sampled_from([None, "a", "b", "c"]), st.floats(0, NOW),
              st.sampled_from(["m", "n", None]), st.none(), st.integers(0, 300), st.floats(0, NOW),
              st.integers(0, 800).map(lambda n: n * MB)),
    max_size=10, unique_by=lambda w: w.id,
)
policies = st.builds(
    PoolPolicy,
    max_workers=st.integers(1, 8),
    idle_min=st.integers(0, 2),
    idle_max=st.integers(2, 5),
    memory_budget=st.sampled_from([0, 500 * MB, 2000 * MB]),
    max_worker_rss=st.sampled_from([0, 400 * MB]),
    max_turns=st.sampled_from([0, 100]),
    spare_max_age_s=st.sampled_from([0.0, 600.0]),
    idle_ttl_s=st.sampled_from([0.0, 600.0]),
    max_concurrent_spawns=st.integers(1, 3),
)
modes = st.sampled_from(["minted", "fresh"])


@given(worker_views, st.sampled_from([None, "a", "b", "z"]), st.integers(1, 8), modes)
def test_assign_never_exceeds_the_cap_nor_takes_a_busy_worker(
    workers: list[WorkerView], session: str | None, cap: int, mode: SessionMode
) -> None:
    decision = assign(workers, Want(S, session), cap, mode)
    live = [w for w in workers if w.state is not D]
    by_id = {w.id: w for w in workers}
    available = [w for w in live if w.state in (R, I)]
    if decision.action == "take":
        taken = by_id[decision.worker_id]  # type: ignore[index]
        assert taken.state in (R, I)
        if session is None and mode == "fresh":
            assert taken.state is R  # in fresh mode a used process never starts a new session
        if session is not None and any(w.state is I and w.session_id == session for w in workers):
            assert taken.session_id == session  # affinity first
    if decision.action == "spawn":
        if mode == "minted" or session is not None:
            assert not available  # never spawn on the request path while a worker is available
        if decision.evict_id is None:
            assert len(live) < cap
        else:
            assert mode == "fresh" and by_id[decision.evict_id].state is I
    if decision.action == "wait":
        assert not (mode == "minted" and available)


@given(worker_views, policies, st.integers(0, 3), st.integers(0, 1), st.integers(0, 8), modes)
def test_reconcile_respects_every_bound(workers: list[WorkerView], p: PoolPolicy, in_flight: int, reserved: int,
                                        peak: int, mode: SessionMode) -> None:
    plan = reconcile(workers, p, NOW, mode=mode, peak=peak, in_flight=in_flight, reserved=reserved)
    by_id = {w.id: w for w in workers}
    stopped = {s.worker_id for s in plan.stop}
    counted = sum(1 for w in workers if w.state is not D)
    assert counted + plan.start + reserved <= max(p.max_workers, counted + reserved)
    assert plan.start + in_flight <= max(p.max_concurrent_spawns, in_flight)
    assert len(stopped) == len(plan.stop)
    for stop in plan.stop:
        assert by_id[stop.worker_id].state in (R, I)  # busy, starting and stopping workers are never stopped
        assert stop.reason != "room_for_spare" or mode == "fresh"
    counted_states = (R, I) if mode == "minted" else (R,)
    reserve = sum(1 for w in workers if w.state in counted_states and w.id not in stopped)
    starting = sum(1 for w in workers if w.state is ST)
    busy = sum(1 for w in workers if w.state is B)
    # Never more starts than the reserve lacks.
    assert plan.start <= max(0, reserve_target(p, peak, busy) - reserve - starting)
    if p.idle_ttl_s and not p.memory_budget and not p.max_turns and not p.max_worker_rss and not p.spare_max_age_s:
        # The idle_min most recent members of the reserve are never stopped for idle time.
        assert reserve >= min(p.idle_min, sum(1 for w in workers if w.state in counted_states))


# --- properties of each reconcile step (each sees the live workers the steps before it kept) -----

live_views = worker_views.map(lambda ws: [w for w in ws if w.state not in (D, SP)])


@given(live_views, policies)
def test_recycle_stops_exactly_the_worn_idle_workers_and_the_old_spares(workers: list[WorkerView],
                                                                         p: PoolPolicy) -> None:
    stops = {s.worker_id: s.reason for s in recycle(workers, p, NOW)}
    for w in workers:
        worn_turns = w.state is I and p.max_turns and w.turns >= p.max_turns
        worn_rss = w.state is I and p.max_worker_rss and w.rss >= p.max_worker_rss
        old = w.state is R and p.spare_max_age_s and NOW - w.created_at >= p.spare_max_age_s
        expected = "recycle_turns" if worn_turns else "recycle_rss" if worn_rss else "spare_age" if old else None
        assert stops.get(w.id) == expected  # and so a busy or starting worker never


@given(live_views, policies, modes)
def test_expire_idle_stops_stale_available_workers_lru_first_keeping_idle_min(
    workers: list[WorkerView], p: PoolPolicy, mode: SessionMode
) -> None:
    stops = expire_idle(workers, p, NOW, mode)
    by_id = {w.id: w for w in workers}
    stopped = {s.worker_id for s in stops}
    assert len(stopped) == len(stops) and all(s.reason == "idle_ttl" for s in stops)
    if not p.idle_ttl_s:
        assert stops == ()
    for s in stops:
        w = by_id[s.worker_id]
        assert w.available and NOW - w.last_used >= p.idle_ttl_s
        assert not (w.state is R and NOW - w.created_at < SPARE_MIN_LIFE_S)  # a young spare stays
    members = reserve(workers, mode)
    assert sum(1 for w in members if w.id not in stopped) >= min(p.idle_min, len(members))
    # Of the stale reserve, the least recently used go; the most recently used stay.
    stale = [w for w in members if p.idle_ttl_s and NOW - w.last_used >= p.idle_ttl_s
             and not (w.state is R and NOW - w.created_at < SPARE_MIN_LIFE_S)]
    gone, stayed = [w for w in stale if w.id in stopped], [w for w in stale if w.id not in stopped]
    assert all(g.last_used <= s.last_used for g in gone for s in stayed)


@given(live_views, policies)
def test_fit_memory_stops_lru_idle_then_old_spares_only_until_the_workers_fit(
    workers: list[WorkerView], p: PoolPolicy
) -> None:
    stops = fit_memory(workers, p)
    by_id = {w.id: w for w in workers}
    stopped = {s.worker_id for s in stops}
    total = sum(w.rss for w in workers)
    assert len(stopped) == len(stops) and all(s.reason == "memory" for s in stops)
    if not p.memory_budget or total <= p.memory_budget:
        assert stops == ()
        return
    idle = [w for w in workers if w.state is I]
    spares = [w for w in workers if w.state is R]
    remaining = total - sum(by_id[s.worker_id].rss for s in stops)
    # It fits, unless every candidate went; and it stops no more than it needs to.
    assert remaining <= p.memory_budget or len(stops) == len(idle) + max(0, len(spares) - p.idle_min)
    if stops:
        assert remaining + by_id[stops[-1].worker_id].rss > p.memory_budget
    assert all(by_id[s.worker_id].state in (R, I) for s in stops)
    assert sum(1 for w in spares if w.id not in stopped) >= min(p.idle_min, len(spares))
    if any(by_id[s.worker_id].state is R for s in stops):
        assert all(w.id in stopped for w in idle)  # idle session workers go before spares
    gone, stayed = [w for w in idle if w.id in stopped], [w for w in idle if w.id not in stopped]
    assert all(g.last_used <= s.last_used for g in gone for s in stayed)  # least recently used first


@given(live_views, policies, modes, st.integers(0, 8), st.integers(0, 3), st.integers(0, 3), st.booleans())
def test_grow_starts_what_the_reserve_lacks_within_the_cap_throttle_and_budget(
    workers: list[WorkerView], p: PoolPolicy, mode: SessionMode, peak: int, in_flight: int, extra: int,
    defer: bool,
) -> None:
    occupied = len(workers) + extra  # e.g. stopping workers and reserved slots
    plan = grow(workers, p, NOW, mode=mode, peak=peak, in_flight=in_flight, occupied=occupied,
                defer_growth=defer)
    available = len(reserve(workers, mode))
    starting = sum(1 for w in workers if w.state is ST)
    busy = sum(1 for w in workers if w.state is B)
    room, spawn_room = p.max_workers - occupied, p.max_concurrent_spawns - in_flight
    lacking = max(0, reserve_target(p, peak, busy) - available - starting)
    below_floor = max(0, p.idle_min - available - starting)
    assert 0 <= plan.start <= max(0, min(room, spawn_room, lacking))
    if defer:
        assert plan.start == 0
    else:
        assert plan.start >= min(below_floor, max(0, room), max(0, spawn_room))  # the floor always starts
    if p.memory_budget and plan.start > below_floor:  # growth beyond the floor fits the budget
        measured = sorted(w.rss for w in workers if w.rss)
        per_worker = measured[len(measured) // 2] if measured else DEFAULT_WORKER_RSS
        assert sum(w.rss for w in workers) + plan.start * per_worker <= p.memory_budget
    by_id = {w.id: w for w in workers}
    for s in plan.stop:
        w = by_id[s.worker_id]
        assert mode == "fresh" and s.reason == "room_for_spare"
        assert w.state is I and NOW - w.last_used >= RECENTLY_USED_S
    assert len(plan.stop) <= lacking and (not plan.stop or room < lacking)
