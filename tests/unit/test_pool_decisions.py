"""The pool's decisions as pure functions over plain state: no processes needed."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from droidpool.config import ModelSpec
from droidpool.pool import MAX_CONCURRENT_SPAWNS, Want, WorkerView, assign, spares_to_start
from droidpool.worker import SessionSettings, WorkerState

S = SessionSettings(model_id="m")


def view(i: int, state: WorkerState, session: str | None = None, used: float = 0.0, model: str = "m",
         settings: SessionSettings | None = None) -> WorkerView:
    return WorkerView(i, state, model, session, used, settings)


def test_follow_up_goes_to_the_worker_holding_its_session() -> None:
    workers = [view(1, WorkerState.IDLE, "a", 1), view(2, WorkerState.IDLE, "b", 0), view(3, WorkerState.READY)]
    assert assign(workers, Want(S, "b"), 4).worker_id == 2


def test_evicted_session_loads_into_the_least_recently_used_idle_worker() -> None:
    workers = [view(1, WorkerState.IDLE, "a", 5), view(2, WorkerState.IDLE, "b", 1), view(3, WorkerState.READY)]
    decision = assign(workers, Want(S, "z"), 4)
    assert (decision.action, decision.worker_id) == ("take", 2)


def test_new_conversation_takes_a_matching_spare_then_any_spare() -> None:
    other = SessionSettings(model_id="x")
    workers = [view(1, WorkerState.READY, settings=other, model="x"), view(2, WorkerState.READY, settings=S)]
    assert assign(workers, Want(S), 4).worker_id == 2
    assert assign([workers[0]], Want(S), 4).worker_id == 1


def test_new_conversation_never_takes_a_used_worker() -> None:
    workers = [view(1, WorkerState.IDLE, "a")]
    assert assign(workers, Want(S), 4).action == "spawn"


def test_at_the_cap_the_lru_idle_worker_is_evicted_for_a_new_conversation() -> None:
    workers = [view(1, WorkerState.IDLE, "a", 9), view(2, WorkerState.IDLE, "b", 3), view(3, WorkerState.BUSY, "c")]
    decision = assign(workers, Want(S), 3)
    assert (decision.action, decision.evict_id) == ("spawn", 2)


def test_all_busy_at_the_cap_waits() -> None:
    workers = [view(1, WorkerState.BUSY, "a"), view(2, WorkerState.STARTING)]
    assert assign(workers, Want(S), 2).action == "wait"
    assert assign(workers, Want(S, "a"), 2).action == "wait"


def test_spares_fill_up_to_the_configured_count_within_the_cap() -> None:
    specs = [ModelSpec("m", 2), ModelSpec("n", 1)]
    assert spares_to_start([], specs, 4, 0) == ["m", "m"][:MAX_CONCURRENT_SPAWNS]
    assert spares_to_start([view(1, WorkerState.READY), view(2, WorkerState.STARTING)], specs, 4, 0) == ["n"]
    assert spares_to_start([view(i, WorkerState.BUSY) for i in range(4)], specs, 4, 0) == []


def test_default_model_spares_are_counted() -> None:
    """A spec id of "" (droid's default model) matches spares whose model_id is None."""
    spare = view(1, WorkerState.READY, model=None)  # type: ignore[arg-type]
    assert spares_to_start([spare], [ModelSpec("", 1)], 4, 0) == []


states = st.sampled_from(list(WorkerState))
worker_views = st.lists(
    st.builds(view, st.integers(0, 50), states, st.sampled_from([None, "a", "b", "c"]), st.floats(0, 100)),
    max_size=10, unique_by=lambda w: w.id,
)


@given(worker_views, st.sampled_from([None, "a", "b", "z"]), st.integers(1, 8))
def test_assign_never_exceeds_the_cap_nor_takes_a_busy_worker(workers: list[WorkerView], session: str | None, cap: int) -> None:
    decision = assign(workers, Want(S, session), cap)
    live = [w for w in workers if w.state is not WorkerState.DEAD]
    by_id = {w.id: w for w in workers}
    if decision.action == "take":
        taken = by_id[decision.worker_id]  # type: ignore[index]
        assert taken.state in (WorkerState.READY, WorkerState.IDLE)
        if session is None:
            assert taken.state is WorkerState.READY  # a used process never starts a new session
    if decision.action == "spawn":
        if decision.evict_id is None:
            assert len(live) < cap
        else:
            assert by_id[decision.evict_id].state is WorkerState.IDLE


@given(worker_views, st.integers(1, 8), st.integers(0, 2))
def test_spares_never_exceed_the_cap(workers: list[WorkerView], cap: int, in_flight: int) -> None:
    live = sum(1 for w in workers if w.state is not WorkerState.DEAD)
    started = spares_to_start(workers, [ModelSpec("m", 3)], cap, in_flight)
    assert live + len(started) <= max(cap, live)
    assert len(started) + in_flight <= max(MAX_CONCURRENT_SPAWNS, in_flight)
