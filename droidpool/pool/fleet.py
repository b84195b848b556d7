"""The pool's worker processes: starting one (with back-off), stopping and retiring them, counting."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import structlog

from droidpool import errors
from droidpool.droid.rpc import DroidRequestError
from droidpool.droid.spec import LaunchSpec, SessionSettings
from droidpool.droid.worker import Worker, WorkerState

from . import procfs
from .policy import PoolPolicy, StopReason, WorkerView

log = structlog.get_logger(__name__)

BACKOFF_MAX_S = 30.0
NOT_READY_AFTER_FAILURES = 3

WorkerFactory = Callable[[LaunchSpec, str | None], Worker]


@dataclass
class Setup:
    """What the pool runs, and within which limits; replaced in place when the config is reloaded."""

    spec: LaunchSpec
    policy: PoolPolicy
    base_settings: SessionSettings


class Fleet:
    """Every worker the pool has, and their bookkeeping. ``on_change`` is called when a worker
    goes (it exited, or was discarded): a waiting request or the supervisor may act on it."""

    def __init__(self, setup: Setup, task_group: anyio.abc.TaskGroup, factory: WorkerFactory,
                 counters: collections.Counter[str], on_change: Callable[[], None]) -> None:
        self.setup = setup
        self._tg = task_group
        self._factory = factory
        self.counters = counters
        self._on_change = on_change
        self.workers: list[Worker] = []
        self.available_models: list[dict[str, Any]] = []
        self.models_listed = anyio.Event()  # set once a worker has listed droid's models
        self.spawning = 0
        self.spawn_failures = 0
        self.last_spawn_error: str | None = None
        self._backoff_until = 0.0
        self.peak_workers = 0
        self.closing = False

    def views(self) -> list[WorkerView]:
        return [
            WorkerView(w.id, w.state, w.model_id, w.session_id, w.last_used, w.settings,
                       w.turns, w.created_at, w.rss)
            for w in self.workers
        ]

    def counts(self) -> dict[str, int]:
        states = collections.Counter(w.state.value for w in self.workers)
        return {s.value: states.get(s.value, 0) for s in WorkerState}

    def by_id(self, worker_id: int | None) -> Worker | None:
        return next((w for w in self.workers if w.id == worker_id), None)

    @property
    def failing(self) -> bool:
        """In a spawn-failure streak: droid cannot be started."""
        return self.spawn_failures >= NOT_READY_AFTER_FAILURES

    # --- starting ----------------------------------------------------------------------------

    def new_worker(self, model_id: str | None) -> Worker:
        """A worker not yet started, counted from now on (against the cap, and in the peak)."""
        worker = self._factory(self.setup.spec, model_id)
        worker.on_exit = self._on_exit
        self.workers.append(worker)
        live = sum(1 for w in self.workers if w.state is not WorkerState.DEAD)
        self.peak_workers = max(self.peak_workers, live)
        return worker

    @property
    def backing_off(self) -> bool:
        return time.monotonic() < self._backoff_until

    def check_backoff(self) -> None:
        if self.backing_off:
            raise errors.Unavailable(
                f"droid workers are failing to start: {self.last_spawn_error}",
                retry_after=self._backoff_until - time.monotonic(),
            )

    async def spawn(self, worker: Worker) -> None:
        """Start a process and wait until it answers; failures feed the backoff."""
        timeout = self.setup.policy.spawn_timeout_s
        self.spawning += 1
        self.counters["spawns"] += 1
        try:
            await worker.start(self._tg)
            with anyio.fail_after(timeout):
                models = await worker.list_models(timeout)
            if models:
                self.available_models = models
                self.models_listed.set()
        except (errors.DroidpoolError, DroidRequestError, TimeoutError) as exc:
            message = str(exc) if not isinstance(exc, TimeoutError) else (
                f"droid did not answer within {timeout:g} s of starting"
            )
            tail = worker.stderr_tail(300)
            message = message if not tail or tail in message else f"{message}: {tail}"
            if (worker.exit_code is not None and worker.exit_code < 0
                    and worker.state is not WorkerState.STOPPING):
                # Killed by a signal from outside: a crash to replace, not a sign that droid
                # cannot start (those exit with a status, or never answer).
                log.warning("pool.spawn_killed", worker=worker.id, signal=-worker.exit_code)
                raise errors.WorkerCrashed(f"a starting droid worker was killed: {message}") from None
            self.spawn_failures += 1
            self.counters["spawn_failures"] += 1
            self.last_spawn_error = message
            self._backoff_until = time.monotonic() + min(BACKOFF_MAX_S, 0.5 * 2**self.spawn_failures)
            log.error("pool.spawn_failed", worker=worker.id, error=message, failures=self.spawn_failures)
            raise errors.Unavailable(f"cannot start a droid worker: {message}", retry_after=5) from None
        finally:
            self.spawning -= 1
        self.spawn_failures = 0
        self.last_spawn_error = None

    def remember_models(self, worker: Worker) -> None:
        if worker.available_models:
            self.available_models = worker.available_models
            self.models_listed.set()

    # --- stopping ----------------------------------------------------------------------------

    async def stop(self, worker: Worker) -> None:
        await worker.stop()
        self.prune()

    async def discard(self, worker: Worker) -> None:
        """Stop a worker that cannot serve (it failed to start or to prepare), even if cancelled."""
        with anyio.CancelScope(shield=True):
            await worker.stop()
        self.prune()
        self._on_change()

    def retire_soon(self, worker: Worker, reason: StopReason) -> None:
        """Stop an idle worker or a spare in the background; a busy one is left alone."""
        if worker.state not in (WorkerState.IDLE, WorkerState.READY):
            return
        worker.state = WorkerState.STOPPING
        self.counters[f"stops_{reason}"] += 1
        if reason in ("recycle_turns", "recycle_rss"):
            self.counters["recycles"] += 1
        elif reason in ("memory", "room_for_spare", "idle_ttl"):
            self.counters["evictions"] += 1
        log.info("pool.retire", worker=worker.id, reason=reason, session=worker.session_id,
                 rss_mb=worker.rss // (1024 * 1024), turns=worker.turns)
        self._tg.start_soon(self.stop, worker)

    async def stop_all(self) -> None:
        """Stop every worker at once, even if cancelled; crashes are no longer counted."""
        self.closing = True
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as stops:
                for worker in list(self.workers):
                    stops.start_soon(worker.stop)

    def prune(self) -> None:
        self.workers = [w for w in self.workers if w.state is not WorkerState.DEAD]

    def measure(self) -> None:
        """Each live worker's resident memory, over its whole process group."""
        pids = {w.pid: w for w in self.workers if w.pid is not None and w.alive}
        for pgid, rss in procfs.group_rss(pids).items():
            pids[pgid].rss = rss

    def _on_exit(self, worker: Worker) -> None:
        if worker.state is not WorkerState.STOPPING and not self.closing:
            self.counters["crashes"] += 1
        self._on_change()
