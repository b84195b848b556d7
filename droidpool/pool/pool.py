"""The worker pool's face: ``open_pool()`` runs one, and ``Pool`` is all its callers see."""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import anyio.abc

from droidpool.droid.spec import LaunchSpec, SessionSettings
from droidpool.droid.worker import Worker, WorkerState

from .fleet import Fleet, Setup, WorkerFactory
from .leasing import Leases, Summary
from .modes import SessionModes
from .policy import PoolPolicy, SessionMode, Want, WorkerView
from .supervisor import Supervisor

__all__ = ["Pool", "Want", "open_pool"]  # callers lease with pool.Want


@asynccontextmanager
async def open_pool(
    spec: LaunchSpec,
    *,
    base_settings: SessionSettings,
    policy: PoolPolicy,
    worker_factory: WorkerFactory = Worker,
    mint: bool = True,
) -> AsyncIterator[Pool]:
    """Run a pool: its supervisor and its workers' tasks live in a task group of its own. On the
    way out every worker is stopped, even when cancelled."""
    failed: BaseException | None = None
    async with anyio.create_task_group() as tg:
        pool = Pool(tg, spec, base_settings=base_settings, policy=policy, worker_factory=worker_factory,
                    mint=mint)
        tg.start_soon(pool.supervisor.run)
        try:
            yield pool
        except BaseException as exc:  # noqa: BLE001 - re-raised below, as itself
            failed = exc
        finally:
            await pool.fleet.stop_all()
            tg.cancel_scope.cancel()
    pool.fleet.workers.clear()
    if failed is not None:
        # Out of the task group: the caller sees its own exception, not an ExceptionGroup.
        raise failed


class Pool:
    """Owns every worker; built and run by ``open_pool``. ``async with pool.lease(want)`` borrows one.

    Any worker serves any request. The pool is four objects with one job each, wired here: the
    ``Fleet`` (its processes), the ``Leases`` (requests to workers), the ``Supervisor`` (the
    reconcile loop) and the ``SessionModes`` (how new conversations start). Their decisions are
    pure functions (``policy.assign``, ``reconcile.reconcile``).
    """

    def __init__(
        self,
        task_group: anyio.abc.TaskGroup,
        spec: LaunchSpec,
        *,
        base_settings: SessionSettings,
        policy: PoolPolicy,
        worker_factory: WorkerFactory = Worker,
        mint: bool = True,
    ) -> None:
        self.setup = Setup(spec, policy, base_settings)
        self.counters: collections.Counter[str] = collections.Counter()
        self.fleet = Fleet(self.setup, task_group, worker_factory, self.counters, on_change=self._changed)
        self.modes = SessionModes(self.setup, mint, self.counters, on_broken=self._retire_used_spares)
        self.leases = Leases(self.setup, self.fleet, self.modes, kick=self._kick)
        self.supervisor = Supervisor(self.setup, self.fleet, self.leases, self.modes, task_group)

    def __repr__(self) -> str:
        states = collections.Counter(w.state.value for w in self.workers)
        parts = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        return f"<Pool [{parts or 'empty'}, {self.leases.waiting} queued] cap={self.max_workers} {self.mode}>"

    # --- leasing -----------------------------------------------------------------------------

    def lease(self, want: Want) -> AbstractAsyncContextManager[Worker]:
        """A worker holding ``want``'s session (loaded, or new), BUSY until the block ends."""
        return self.leases.lease(want)

    def session_lock(self, session_id: str) -> AbstractAsyncContextManager[None]:
        """Serialize everything done to one droid session."""
        return self.leases.session_lock(session_id)

    @property
    def on_starved(self) -> Callable[[], bool] | None:
        """Called when a request must wait with every worker busy and no room to start one: the
        turn service may free a worker (a turn parked on client tools yields). True if it did."""
        return self.leases.on_starved

    @on_starved.setter
    def on_starved(self, callback: Callable[[], bool] | None) -> None:
        self.leases.on_starved = callback

    def begin_drain(self) -> None:
        """Refuse new leases (503); running turns go on. Queued requests are told at once."""
        self.leases.begin_drain()

    def forget_session(self, session_id: str) -> None:
        """Another node ran turns on this session: a worker here that holds it is stale; retire it
        (the next turn loads the session from its restored files)."""
        for worker in self.workers:
            if worker.session_id == session_id:
                self.fleet.retire_soon(worker, "stale_session")

    # --- configuration -----------------------------------------------------------------------

    @property
    def spec(self) -> LaunchSpec:
        return self.setup.spec

    @property
    def policy(self) -> PoolPolicy:
        return self.setup.policy

    @property
    def base_settings(self) -> SessionSettings:
        return self.setup.base_settings

    @property
    def max_workers(self) -> int:
        return self.setup.policy.max_workers

    def reconfigure(self, policy: PoolPolicy, spec: LaunchSpec | None = None) -> None:
        """Apply a reloaded config; running turns are untouched. Spares of an old launch
        spec are replaced, and a new droid is self-tested again; used workers keep the old
        spec until they are recycled."""
        self.setup.policy = policy
        if spec is not None and spec != self.setup.spec:
            self.setup.spec = spec
            self.modes.retest()
            for worker in self.workers:
                if worker.state is WorkerState.READY:
                    self.fleet.retire_soon(worker, "reconfigured")
        self.leases.wake_all()
        self._kick()

    # --- state, for probes, metrics and logs -------------------------------------------------

    @property
    def workers(self) -> list[Worker]:
        return self.fleet.workers

    @property
    def available_models(self) -> list[dict[str, Any]]:
        return self.fleet.available_models

    @property
    def models_listed(self) -> anyio.Event:
        """Set once a worker has listed droid's models."""
        return self.fleet.models_listed

    @property
    def mode(self) -> SessionMode:
        return self.modes.mode

    @property
    def self_test(self) -> str:
        return self.modes.self_test

    @property
    def peak_workers(self) -> int:
        return self.fleet.peak_workers

    @property
    def spawn_failures(self) -> int:
        return self.fleet.spawn_failures

    @property
    def last_spawn_error(self) -> str | None:
        return self.fleet.last_spawn_error

    @property
    def queue_wait(self) -> Summary:
        return self.leases.queue_wait

    @property
    def ready(self) -> bool:
        """Can serve: not draining, not in a spawn-failure streak."""
        return not self.fleet.failing and self.leases.open

    def views(self) -> list[WorkerView]:
        return self.fleet.views()

    def counts(self) -> dict[str, int]:
        return self.fleet.counts() | {"queued": self.leases.waiting}

    def stats(self) -> dict[str, Any]:
        """Counters and gauges for metrics and logs."""
        return {
            "workers": self.counts(),
            "rss_bytes": sum(w.rss for w in self.workers),
            "peak_workers": self.peak_workers,
            "max_workers": self.max_workers,
            "spawn_failures_in_a_row": self.spawn_failures,
            "queue_wait": self.queue_wait.snapshot(),
            "session_mode": self.mode,
            **{f"{name}_total": value for name, value in sorted(self.counters.items())},
        }

    def sessions_status(self) -> dict[str, str]:
        """How new conversations start, and what the self-test found (for /readyz, doctor)."""
        return {"mode": self.mode, "self_test": self.self_test}

    def supervisor_alive(self, max_age_s: float) -> bool:
        return self.supervisor.alive(max_age_s)

    async def wait_warm(self, timeout: float) -> bool:
        """Wait until ``idle_min`` workers are available and the self-test has run (for
        readiness notification)."""
        with anyio.move_on_after(timeout):
            while (sum(1 for w in self.workers if w.state in (WorkerState.READY, WorkerState.IDLE))
                   < self.policy.idle_min or (self.modes.pending and self.policy.idle_min)):
                if self.fleet.failing:
                    return False
                await anyio.sleep(0.05)
            return True
        return False

    # --- wiring ------------------------------------------------------------------------------

    def _kick(self) -> None:
        self.supervisor.kick()

    def _changed(self) -> None:
        """A worker went: a queued request may now spawn one, and the supervisor may top up."""
        self.leases.wake_one()
        self.supervisor.kick()

    def _retire_used_spares(self) -> None:
        """Minting is broken: a spare that has loaded a session is no longer fresh."""
        for worker in self.workers:
            if worker.state is WorkerState.READY and worker.used:
                self.fleet.retire_soon(worker, "reconfigured")
        self._kick()
