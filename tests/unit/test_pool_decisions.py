"""The pool's decisions as pure functions over plain state: no processes needed."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from droidpool.config import ModelSpec
from droidpool.droid.worker import SessionSettings, WorkerState
from droidpool.pool.policy import (
    MB,
    RECENTLY_USED_S,
    SPARE_MIN_LIFE_S,
    PoolPolicy,
    Want,
    WorkerView,
    assign,
    reconcile,
    spare_targets,
)

S = SessionSettings(model_id="m")
R, I, B, ST, D = WorkerState.READY, WorkerState.IDLE, WorkerState.BUSY, WorkerState.STARTING, WorkerState.DEAD
NOW = 10_000.0


def view(i: int, state: WorkerState, session: str | None = None, used: float = 0.0, model: str | None = "m",
         settings: SessionSettings | None = None, turns: int = 0, created: float = 0.0, rss: int = 0) -> WorkerView:
    return WorkerView(i, state, model, session, used, settings, turns, created, rss)


def policy(**kw: object) -> PoolPolicy:
    base: dict[str, object] = {"max_workers": 4, "models": (ModelSpec("m", 1),)}
    return PoolPolicy(**{**base, **kw})  # type: ignore[arg-type]


# --- assignment ------------------------------------------------------------------------------


def test_follow_up_goes_to_the_worker_holding_its_session() -> None:
    workers = [view(1, I, "a", 1), view(2, I, "b", 0), view(3, R)]
    assert assign(workers, Want(S, "b"), 4).worker_id == 2


def test_evicted_session_loads_into_the_least_recently_used_idle_worker() -> None:
    workers = [view(1, I, "a", 5), view(2, I, "b", 1), view(3, R)]
    decision = assign(workers, Want(S, "z"), 4)
    assert (decision.action, decision.worker_id) == ("take", 2)


def test_new_conversation_takes_a_matching_spare_then_any_spare() -> None:
    other = SessionSettings(model_id="x")
    workers = [view(1, R, settings=other, model="x"), view(2, R, settings=S)]
    assert assign(workers, Want(S), 4).worker_id == 2
    assert assign([workers[0]], Want(S), 4).worker_id == 1


def test_new_conversation_never_takes_a_used_worker() -> None:
    assert assign([view(1, I, "a")], Want(S), 4).action == "spawn"


def test_at_the_cap_the_lru_idle_worker_is_evicted_for_a_new_conversation() -> None:
    workers = [view(1, I, "a", 9), view(2, I, "b", 3), view(3, B, "c")]
    decision = assign(workers, Want(S), 3)
    assert (decision.action, decision.evict_id) == ("spawn", 2)


def test_all_busy_at_the_cap_waits() -> None:
    workers = [view(1, B, "a"), view(2, ST)]
    assert assign(workers, Want(S), 2).action == "wait"
    assert assign(workers, Want(S, "a"), 2).action == "wait"


# --- reconciliation --------------------------------------------------------------------------


def test_spares_fill_up_within_the_cap_and_the_spawn_throttle() -> None:
    p = policy(models=(ModelSpec("m", 2), ModelSpec("n", 1)), max_concurrent_spawns=2)
    assert reconcile([], p, NOW).start == ("m", "m")
    assert reconcile([view(1, R), view(2, ST)], p, NOW).start == ("n",)
    assert reconcile([], p, NOW, in_flight=2).start == ()


def test_default_model_spares_are_counted() -> None:
    """With no models configured, "" stands for droid's default model (model_id None)."""
    p = policy(models=())
    assert reconcile([view(1, R, model=None)], p, NOW).start == ()
    assert reconcile([], p, NOW).start == ("",)


def test_at_the_cap_an_idle_session_worker_gives_way_to_a_spare() -> None:
    workers = [view(1, I, "a", used=NOW - 100), view(2, I, "b", used=NOW - 200), view(3, B, "c"), view(4, B, "d")]
    plan = reconcile(workers, policy(), NOW)
    assert plan.start == ()  # the victim still counts until it is dead
    assert [(s.worker_id, s.reason) for s in plan.stop] == [(2, "room_for_spare")]
    after = [w for w in workers if w.id != 2]
    assert reconcile(after, policy(), NOW).start == ("m",)


def test_a_conversation_that_just_ran_keeps_its_worker_over_a_spare() -> None:
    workers = [view(1, I, "a", used=NOW - RECENTLY_USED_S + 1), view(2, B, "c"), view(3, B, "d"), view(4, B, "e")]
    plan = reconcile(workers, policy(), NOW)
    assert plan.stop == () and plan.start == ()


def test_worn_idle_workers_and_old_spares_are_recycled() -> None:
    p = policy(max_turns=100, max_worker_rss=400 * MB, idle_ttl_s=600, spare_max_age_s=3600)
    workers = [
        view(1, I, "a", used=NOW, turns=100),
        view(2, I, "b", used=NOW, rss=450 * MB),
        view(3, I, "c", used=NOW - 700),
        view(4, R, created=NOW - 4000),
        view(5, B, "e", turns=500, rss=900 * MB),  # busy: never touched
    ]
    reasons = {s.worker_id: s.reason for s in reconcile(workers, p, NOW).stop}
    assert reasons == {1: "recycle_turns", 2: "recycle_rss", 3: "idle_ttl", 4: "spare_age"}


def test_over_the_memory_budget_lru_idle_go_first_then_surplus_spares() -> None:
    p = policy(models=(ModelSpec("m", 1, 3),), memory_budget=1000 * MB)
    workers = [
        view(1, I, "a", used=50, rss=300 * MB),
        view(2, I, "b", used=10, rss=300 * MB),
        view(3, R, created=1, rss=200 * MB),
        view(4, R, created=2, rss=200 * MB),
        view(5, B, "c", rss=300 * MB),
    ]
    plan = reconcile(workers, p, NOW, demand={"m": 2})
    assert [(s.worker_id, s.reason) for s in plan.stop] == [(2, "memory")]  # 1300 → 1000
    tighter = reconcile(workers, policy(models=(ModelSpec("m", 1, 3),), memory_budget=500 * MB), NOW, demand={"m": 2})
    assert [s.worker_id for s in tighter.stop] == [2, 1, 3]  # LRU idle, then the older surplus spare
    assert tighter.start == ()


def test_minimum_spares_start_even_before_memory_is_measured_but_growth_is_budgeted() -> None:
    p = policy(models=(ModelSpec("m", 1, 3),), memory_budget=300 * MB, max_concurrent_spawns=4)
    assert reconcile([], p, NOW, demand={"m": 3}).start == ("m",)  # 1 floor; no room for 2 more at 200 MB
    roomy = policy(models=(ModelSpec("m", 1, 3),), memory_budget=2000 * MB, max_concurrent_spawns=4)
    assert reconcile([], roomy, NOW, demand={"m": 3}).start == ("m", "m", "m")


def test_spares_follow_demand_between_min_and_max() -> None:
    specs = (ModelSpec("m", 1, 3),)
    assert spare_targets(specs, {}) == {"m": 1}
    assert spare_targets(specs, {"m": 2}) == {"m": 2}
    assert spare_targets(specs, {"m": 9}) == {"m": 3}
    p = policy(models=specs, max_concurrent_spawns=4)
    assert reconcile([], p, NOW, demand={"m": 5}).start == ("m", "m", "m")
    young = [view(1, R, created=NOW - 1), view(2, R, created=NOW - 1), view(3, R, created=NOW - 1)]
    assert reconcile(young, p, NOW).stop == ()  # too young to shed: no thrash
    old = [view(i, R, created=NOW - SPARE_MIN_LIFE_S - i) for i in (1, 2, 3)]
    assert {s.reason for s in reconcile(old, p, NOW).stop} == {"spare_surplus"}
    assert len(reconcile(old, p, NOW).stop) == 2


def test_spares_of_models_no_longer_configured_are_stopped() -> None:
    plan = reconcile([view(1, R, model="gone", created=NOW)], policy(), NOW)
    assert [(s.worker_id, s.reason) for s in plan.stop] == [(1, "spare_surplus")]


# --- properties --------------------------------------------------------------------------------

states = st.sampled_from(list(WorkerState))
worker_views = st.lists(
    st.builds(view, st.integers(0, 50), states, st.sampled_from([None, "a", "b", "c"]), st.floats(0, NOW),
              st.sampled_from(["m", "n", None]), st.none(), st.integers(0, 300), st.floats(0, NOW),
              st.integers(0, 800) .map(lambda n: n * MB)),
    max_size=10, unique_by=lambda w: w.id,
)
policies = st.builds(
    PoolPolicy,
    max_workers=st.integers(1, 8),
    models=st.lists(st.builds(ModelSpec, st.sampled_from(["m", "n", ""]), st.integers(0, 2), st.integers(-1, 4)),
                    max_size=2, unique_by=lambda m: m.id).map(tuple),
    memory_budget=st.sampled_from([0, 500 * MB, 2000 * MB]),
    max_worker_rss=st.sampled_from([0, 400 * MB]),
    max_turns=st.sampled_from([0, 100]),
    spare_max_age_s=st.sampled_from([0.0, 600.0]),
    idle_ttl_s=st.sampled_from([0.0, 600.0]),
    max_concurrent_spawns=st.integers(1, 3),
)


@given(worker_views, st.sampled_from([None, "a", "b", "z"]), st.integers(1, 8))
def test_assign_never_exceeds_the_cap_nor_takes_a_busy_worker(workers: list[WorkerView], session: str | None, cap: int) -> None:
    decision = assign(workers, Want(S, session), cap)
    live = [w for w in workers if w.state is not D]
    by_id = {w.id: w for w in workers}
    if decision.action == "take":
        taken = by_id[decision.worker_id]  # type: ignore[index]
        assert taken.state in (R, I)
        if session is None:
            assert taken.state is R  # a used process never starts a new session
    if decision.action == "spawn":
        if decision.evict_id is None:
            assert len(live) < cap
        else:
            assert by_id[decision.evict_id].state is I


@given(worker_views, policies, st.integers(0, 3), st.integers(0, 1), st.dictionaries(st.sampled_from(["m", "n"]), st.integers(0, 5)))
def test_reconcile_respects_every_bound(workers: list[WorkerView], p: PoolPolicy, in_flight: int, reserved: int,
                                        demand: dict[str, int]) -> None:
    plan = reconcile(workers, p, NOW, demand=demand, in_flight=in_flight, reserved=reserved)
    by_id = {w.id: w for w in workers}
    counted = sum(1 for w in workers if w.state is not D)
    assert counted + len(plan.start) + reserved <= max(p.max_workers, counted + reserved)
    assert len(plan.start) + in_flight <= max(p.max_concurrent_spawns, in_flight)
    assert len({s.worker_id for s in plan.stop}) == len(plan.stop)
    for stop in plan.stop:
        assert by_id[stop.worker_id].state in (R, I)  # busy, starting and stopping workers are never stopped
    if p.memory_budget:
        starts_per_model: dict[str, int] = {}
        for model in plan.start:
            starts_per_model[model] = starts_per_model.get(model, 0) + 1
        for spec in p.specs():
            have = sum(1 for w in workers if w.state in (R, WorkerState.STARTING) and (w.model_id or "") == spec.id
                       and w.id not in {s.worker_id for s in plan.stop})
            # Above the configured minimum, spares start only within the memory budget.
            if starts_per_model.get(spec.id, 0) > max(0, spec.spares - have):
                kept = sum(w.rss for w in workers if w.state not in (D, WorkerState.STOPPING)
                           and w.id not in {s.worker_id for s in plan.stop})
                assert kept < p.memory_budget
