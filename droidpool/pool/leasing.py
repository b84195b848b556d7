"""Leases: a worker for each request, now or after a bounded FIFO wait, prepared for its session."""

from __future__ import annotations

import collections
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import structlog

from droidpool import errors
from droidpool.droid.minted import MintFailed
from droidpool.droid.rpc import DroidRequestError
from droidpool.droid.worker import Worker, WorkerState

from .fleet import Fleet, Setup
from .modes import SessionModes
from .policy import Assignment, Want, assign

log = structlog.get_logger(__name__)

SESSION_NOT_FOUND = -32004
MAX_RETRIES_BEFORE_TURN = 2
DEMAND_WINDOW_S = 300.0  # the peak of concurrent requests over this window sizes the reserve


class Summary:
    """Count, sum and maximum of a duration, for metrics."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.max = max(self.max, value)

    def snapshot(self) -> dict[str, float]:
        return {"count": self.count, "sum_s": round(self.total, 6), "max_s": round(self.max, 6)}


class Leases:
    """Hands workers to requests (``assign`` decides), queues requests when none is available,
    and records the demand the supervisor sizes the reserve by. ``kick`` wakes the supervisor."""

    def __init__(self, setup: Setup, fleet: Fleet, modes: SessionModes, kick: Callable[[], None]) -> None:
        self._setup = setup
        self._fleet = fleet
        self._modes = modes
        self._kick = kick
        self.counters = fleet.counters
        # Called when a request must wait with every worker busy and no room to start one: the
        # turn service may free a worker (a turn parked on client tools yields). True if it did.
        self.on_starved: Callable[[], bool] | None = None
        self.draining = False
        self.reserved = 0  # slots promised to a spawn that waits for an eviction
        self.queue_wait = Summary()
        self.last_lease = 0.0
        self._waiters: collections.deque[anyio.Event] = collections.deque()
        self._session_locks: dict[str, tuple[anyio.Lock, int]] = {}
        self._pressure: collections.deque[tuple[float, int]] = collections.deque(maxlen=4096)

    @property
    def open(self) -> bool:
        return not (self._fleet.closing or self.draining)

    @property
    def waiting(self) -> int:
        """Requests queued for a worker."""
        return len(self._waiters)

    @asynccontextmanager
    async def session_lock(self, session_id: str) -> AsyncIterator[None]:
        """Serialize everything done to one droid session."""
        lock, users = self._session_locks.get(session_id, (anyio.Lock(), 0))
        self._session_locks[session_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._session_locks[session_id]
            if users <= 1:
                del self._session_locks[session_id]
            else:
                self._session_locks[session_id] = (lock, users - 1)

    @asynccontextmanager
    async def lease(self, want: Want) -> AsyncIterator[Worker]:
        """A worker holding ``want``'s session (loaded, or new), BUSY until the block ends."""
        worker = await self._acquire(want)
        try:
            yield worker
        finally:
            self._release(worker)

    def begin_drain(self) -> None:
        """Refuse new leases (503); running turns go on. Queued requests are told at once."""
        self.draining = True
        for event in self._waiters:
            event.set()

    def wake_one(self) -> None:
        while self._waiters:
            event = self._waiters.popleft()
            if not event.is_set():
                event.set()
                return

    def wake_all(self) -> None:
        while self._waiters:
            self._waiters.popleft().set()

    def peak(self, now: float) -> int:
        """The most requests running or waiting at once over the last ``DEMAND_WINDOW_S``."""
        return max((n for at, n in self._pressure if now - at <= DEMAND_WINDOW_S), default=0)

    # --- a request's way to a worker ---------------------------------------------------------

    async def _acquire(self, want: Want) -> Worker:
        """Assign a worker now, or wait in a bounded FIFO queue until one frees up."""
        self._check_open()
        policy = self._setup.policy
        started = time.monotonic()
        deadline = started + policy.queue_timeout_s
        ticket: anyio.Event | None = None
        crashes_before_turn = 0
        head = False  # a woken waiter decides before newcomers
        self._note_pressure(1)
        try:
            while True:
                decision = Assignment("wait")
                if head or not self._waiters:
                    decision = assign(self._fleet.views(), want, policy.max_workers - self.reserved,
                                      self._modes.mode)
                if decision.action != "wait":
                    try:
                        worker = await self._apply(decision, want)
                    except errors.WorkerCrashed:
                        # It died before the turn began: nothing was sent, so try another.
                        crashes_before_turn += 1
                        if crashes_before_turn > MAX_RETRIES_BEFORE_TURN:
                            raise
                        log.warning("pool.retry_after_crash", attempt=crashes_before_turn)
                        continue
                    except MintFailed:
                        continue  # now in fresh mode: decide again
                    if worker is not None:
                        self.queue_wait.add(time.monotonic() - started)
                        self.last_lease = time.monotonic()
                        return worker
                    continue
                if ticket is None and len(self._waiters) >= policy.queue_size:
                    self.counters["rejected_queue_full"] += 1
                    raise errors.Overloaded(
                        f"all {policy.max_workers} droid workers are busy and the wait queue is full",
                        retry_after=2,
                    )
                ticket = anyio.Event()
                (self._waiters.appendleft if head else self._waiters.append)(ticket)
                if self.on_starved is not None and self._starved():
                    self.on_starved()
                self._kick()  # the supervisor may grow the pool for it
                with anyio.move_on_after(deadline - time.monotonic()):
                    await ticket.wait()
                if not ticket.is_set():
                    self.counters["rejected_queue_timeout"] += 1
                    raise errors.Overloaded(
                        f"no droid worker became free within {policy.queue_timeout_s:g} s", retry_after=5
                    )
                self._check_open()
                head = True
        finally:
            if ticket is not None and ticket in self._waiters:
                self._waiters.remove(ticket)
            if head:
                self.wake_one()  # pass the turn on if this waiter leaves without a worker

    def _starved(self) -> bool:
        """Every worker is leased and the pool may not grow: only a released lease frees one."""
        alive = [w for w in self._fleet.workers if w.state is not WorkerState.DEAD]
        return len(alive) + self._fleet.spawning >= self._setup.policy.max_workers - self.reserved \
            and all(w.state is WorkerState.BUSY for w in alive) and len(self._waiters) > 0

    def _check_open(self) -> None:
        if not self.open:
            raise errors.Unavailable("droidpool is shutting down", retry_after=5)

    async def _apply(self, decision: Assignment, want: Want) -> Worker | None:
        """Carry out a decision; None means the world changed meanwhile: decide again."""
        fleet = self._fleet
        if decision.evict_id is not None:
            victim = fleet.by_id(decision.evict_id)
            if victim is None or victim.state is not WorkerState.IDLE:
                return None
            self.counters["evictions"] += 1
            log.info("pool.evict", worker=victim.id, session=victim.session_id)
            # The victim's slot passes to this request's new worker: nobody else may take it
            # between the victim's death and the spawn.
            self.reserved += 1
            try:
                await fleet.stop(victim)
                return await self._spawn_for(want)
            finally:
                self.reserved -= 1
        if decision.action == "take":
            worker = fleet.by_id(decision.worker_id)
            if worker is None or worker.state not in (WorkerState.READY, WorkerState.IDLE):
                return None
            was_spare = worker.state is WorkerState.READY
            worker.state = WorkerState.BUSY
            if was_spare:
                self._kick()
            try:
                await self._prepare(worker, want)
            except BaseException:
                await fleet.discard(worker)
                raise
            return worker
        return await self._spawn_for(want)

    async def _spawn_for(self, want: Want) -> Worker:
        fleet = self._fleet
        fleet.check_backoff()
        worker = fleet.new_worker(want.settings.model_id)
        worker.state = WorkerState.BUSY
        self.counters["spawns_on_request"] += 1
        try:
            await fleet.spawn(worker)
            if self._modes.pending and not await self._modes.test(worker):
                raise MintFailed(self._modes.self_test)  # it loaded a session: not fresh; decide again
            await self._prepare(worker, want)
        except BaseException:
            await fleet.discard(worker)
            raise
        return worker

    async def _prepare(self, worker: Worker, want: Want) -> None:
        """Give ``worker`` the session ``want`` needs: load its own, or start a new one."""
        timeout = self._setup.policy.spawn_timeout_s
        servers = want.servers_for(worker.mcp_servers)
        try:
            if want.session_id is not None:
                stale_servers = bool(want.mcp_servers) and worker.mcp_servers != list(want.mcp_servers)
                if worker.session_id != want.session_id or stale_servers:
                    await worker.load_session(want.session_id, timeout, servers)
                    self.counters["session_loads"] += 1
                if want.settings.model_id and worker.model_id != want.settings.model_id:
                    await worker.set_model(want.settings.model_id)
                if want.settings.reasoning_effort:
                    await worker.set_reasoning_effort(want.settings.reasoning_effort)
            elif self._modes.mode == "minted":
                await self._modes.start(worker, want.settings, servers)
            elif worker.settings != want.settings or worker.session_id is None or want.mcp_servers:
                # Safe only because this process has held no conversation (droid leaks old context).
                await worker.initialize(want.settings, timeout, servers)
            self._fleet.remember_models(worker)
        except DroidRequestError as exc:
            if exc.code == SESSION_NOT_FOUND and want.session_id is not None:
                raise errors.SessionNotFound(f"droid has no session {want.session_id}") from None
            raise errors.UpstreamError(f"droid refused {exc.method}: {exc.droid_message}") from None

    def _release(self, worker: Worker) -> None:
        if worker.state is WorkerState.BUSY:
            worker.state = WorkerState.IDLE if worker.used else WorkerState.READY
        worker.last_used = time.monotonic()
        self._note_pressure(0)
        self._fleet.prune()
        self.wake_one()
        self._kick()

    def _note_pressure(self, arriving: int) -> None:
        busy = sum(1 for w in self._fleet.workers if w.state is WorkerState.BUSY)
        self._pressure.append((time.monotonic(), busy + len(self._waiters) + arriving))
