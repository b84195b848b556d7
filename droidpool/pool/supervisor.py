"""The supervisor: a reconcile loop that measures the workers, decides (``reconcile``) and acts."""

from __future__ import annotations

import time

import anyio
import anyio.abc
import structlog

from droidpool import errors
from droidpool.droid.rpc import DroidRequestError
from droidpool.droid.worker import Worker, WorkerState

from .fleet import Fleet, Setup
from .leasing import Leases
from .modes import SessionModes
from .reconcile import GROWTH_DEFER_S, Plan, reconcile

log = structlog.get_logger(__name__)

RECONCILE_EVERY_S = 1.0


class Supervisor:
    """Retires the workers ``reconcile`` stops and starts the spares it asks for, about once a
    second and whenever ``kick``ed (a lease ended, a worker exited, a request waits)."""

    def __init__(self, setup: Setup, fleet: Fleet, leases: Leases, modes: SessionModes,
                 task_group: anyio.abc.TaskGroup) -> None:
        self._setup = setup
        self._fleet = fleet
        self._leases = leases
        self._modes = modes
        self._tg = task_group
        self._wake = anyio.Event()
        self.last_reconcile = time.monotonic()

    def kick(self) -> None:
        self._wake.set()

    def alive(self, max_age_s: float) -> bool:
        """The loop has come round within ``max_age_s``."""
        return time.monotonic() - self.last_reconcile <= max_age_s

    def plan(self) -> Plan:
        """The supervisor's next step (pure: see reconcile.reconcile)."""
        now = time.monotonic()
        leases = self._leases
        defer = now - leases.last_lease < GROWTH_DEFER_S and not leases.waiting
        return reconcile(self._fleet.views(), self._setup.policy, now, mode=self._modes.mode,
                         peak=leases.peak(now), in_flight=self._fleet.spawning, reserved=leases.reserved,
                         defer_growth=defer)

    async def run(self) -> None:
        fleet = self._fleet
        while True:
            self.last_reconcile = time.monotonic()
            fleet.prune()
            fleet.measure()
            if self._leases.open:
                plan = self.plan()
                for stop in plan.stop:
                    worker = fleet.by_id(stop.worker_id)
                    if worker is not None:
                        fleet.retire_soon(worker, stop.reason)
                if not fleet.backing_off:
                    for _ in range(plan.start):
                        spare = fleet.new_worker(self._setup.base_settings.model_id)
                        self._tg.start_soon(self._start_spare, spare)
            with anyio.move_on_after(RECONCILE_EVERY_S):
                await self._wake.wait()
            self._wake = anyio.Event()

    async def _start_spare(self, worker: Worker) -> None:
        fleet, modes = self._fleet, self._modes
        try:
            await fleet.spawn(worker)
            if modes.pending:
                if not await modes.test(worker):
                    await fleet.discard(worker)  # it loaded a session: not a fresh spare
                    return
            elif modes.mode == "fresh":
                await worker.initialize(self._setup.base_settings, self._setup.policy.spawn_timeout_s)
            fleet.remember_models(worker)
        except (errors.DroidpoolError, DroidRequestError, TimeoutError) as exc:
            log.warning("pool.spare_failed", worker=worker.id, error=str(exc))
            await fleet.discard(worker)
            return
        if worker.state is WorkerState.STARTING:
            worker.state = WorkerState.READY
            log.info("pool.spare_ready", worker=worker.id, pid=worker.pid, mode=modes.mode)
        self._leases.wake_one()
