"""The worker pool: any available worker serves any request, bounded admission, leases that always end."""

from __future__ import annotations

import collections
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import structlog

from droidpool import errors
from droidpool.droid import sessions
from droidpool.droid.worker import (
    DroidRequestError,
    LaunchSpec,
    SessionSettings,
    Worker,
    WorkerState,
)

from . import procfs
from .policy import (
    GROWTH_DEFER_S,
    Assignment,
    Plan,
    PoolPolicy,
    SessionMode,
    StopReason,
    WorkerView,
    assign,
    reconcile,
)
from .policy import Want as Want  # re-exported: callers lease with pool.Want

log = structlog.get_logger(__name__)

SESSION_NOT_FOUND = -32004
BACKOFF_MAX_S = 30.0
NOT_READY_AFTER_FAILURES = 3
RECONCILE_EVERY_S = 1.0
MAX_RETRIES_BEFORE_TURN = 2
DEMAND_WINDOW_S = 300.0  # the peak of concurrent requests over this window sizes the reserve


class MintFailed(Exception):
    """A minted session did not load as written: droid's format is not the one droidpool knows."""


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


class Pool:
    """Owns every worker. ``async with pool:`` runs it; ``async with pool.lease(...)`` borrows one.

    New conversations start in minted sessions once a self-test on the first worker has shown
    that droid loads them as written (``mode`` ``minted``); until then, if the test fails, or if
    ``mint`` is off, each needs a fresh spare (``mode`` ``fresh``).
    """

    def __init__(
        self,
        spec: LaunchSpec,
        *,
        base_settings: SessionSettings,
        policy: PoolPolicy,
        worker_factory: Callable[[LaunchSpec, str | None], Worker] = Worker,
        mint: bool = True,
    ) -> None:
        self.spec = spec
        self.base_settings = base_settings
        self.policy = policy
        self._factory = worker_factory
        self.mint = mint and bool(spec.sessions_dir)
        self.mode: SessionMode = "fresh"
        self.self_test = "pending" if self.mint else "off (pool.mint_sessions = false)"
        self.workers: list[Worker] = []
        self.available_models: list[dict[str, Any]] = []
        self.models_listed = anyio.Event()  # set once a worker has listed droid's models
        # Called when a request must wait with every worker busy and no room to start one: the
        # turn service may free a worker (a turn parked on client tools yields). True if it did.
        self.on_starved: Callable[[], bool] | None = None
        self._waiters: collections.deque[anyio.Event] = collections.deque()
        self._session_locks: dict[str, tuple[anyio.Lock, int]] = {}
        self._spawning = 0
        self._reserved = 0  # slots promised to a spawn that waits for an eviction
        self._wake_reconcile = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._closing = False
        self.draining = False
        self.spawn_failures = 0
        self.last_spawn_error: str | None = None
        self._backoff_until = 0.0
        self._pressure: collections.deque[tuple[float, int]] = collections.deque(maxlen=4096)
        self._last_lease = 0.0
        self.counters: collections.Counter[str] = collections.Counter()
        self.queue_wait = Summary()
        self.peak_workers = 0
        self._last_reconcile = time.monotonic()

    @property
    def max_workers(self) -> int:
        return self.policy.max_workers

    def __repr__(self) -> str:
        states = collections.Counter(w.state.value for w in self.workers)
        parts = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        return f"<Pool [{parts or 'empty'}, {len(self._waiters)} queued] cap={self.max_workers} {self.mode}>"

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Pool:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._reconcile_loop)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as stops:
                for worker in list(self.workers):
                    stops.start_soon(worker.stop)
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        self.workers.clear()

    @property
    def ready(self) -> bool:
        """Can serve: not draining, not in a spawn-failure streak."""
        return self.spawn_failures < NOT_READY_AFTER_FAILURES and not (self._closing or self.draining)

    def begin_drain(self) -> None:
        """Refuse new leases (503); running turns go on. Queued requests are told at once."""
        self.draining = True
        for event in self._waiters:
            event.set()

    def reconfigure(self, policy: PoolPolicy, spec: LaunchSpec | None = None) -> None:
        """Apply a reloaded config; running turns are untouched. Spares of an old launch
        spec are replaced, and a new droid is self-tested again; used workers keep the old
        spec until they are recycled."""
        self.policy = policy
        if spec is not None and spec != self.spec:
            self.spec = spec
            if self.mint:
                self.mode, self.self_test = "fresh", "pending"
            for worker in self.workers:
                if worker.state is WorkerState.READY:
                    self._retire_soon(worker, "reconfigured")
        self._wake_all()
        self._kick()

    def views(self) -> list[WorkerView]:
        return [
            WorkerView(w.id, w.state, w.model_id, w.session_id, w.last_used, w.settings,
                       w.turns, w.created_at, w.rss)
            for w in self.workers
        ]

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

    def counts(self) -> dict[str, int]:
        states = collections.Counter(w.state.value for w in self.workers)
        return {s.value: states.get(s.value, 0) for s in WorkerState} | {"queued": len(self._waiters)}

    async def wait_warm(self, timeout: float) -> bool:
        """Wait until ``idle_min`` workers are available and the self-test has run (for
        readiness notification)."""
        with anyio.move_on_after(timeout):
            while (sum(1 for w in self.workers if w.state in (WorkerState.READY, WorkerState.IDLE))
                   < self.policy.idle_min or (self.self_test == "pending" and self.policy.idle_min)):
                if self.spawn_failures >= NOT_READY_AFTER_FAILURES:
                    return False
                await anyio.sleep(0.05)
            return True
        return False

    # --- leasing -----------------------------------------------------------------------------

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

    async def _acquire(self, want: Want) -> Worker:
        """Assign a worker now, or wait in a bounded FIFO queue until one frees up."""
        self._check_open()
        started = time.monotonic()
        deadline = started + self.policy.queue_timeout_s
        ticket: anyio.Event | None = None
        crashes_before_turn = 0
        head = False  # a woken waiter decides before newcomers
        self._note_pressure(1)
        try:
            while True:
                decision = Assignment("wait")
                if head or not self._waiters:
                    decision = assign(self.views(), want, self.max_workers - self._reserved, self.mode)
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
                        self._last_lease = time.monotonic()
                        return worker
                    continue
                if ticket is None and len(self._waiters) >= self.policy.queue_size:
                    self.counters["rejected_queue_full"] += 1
                    raise errors.Overloaded(
                        f"all {self.policy.max_workers} droid workers are busy and the wait queue is full",
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
                        f"no droid worker became free within {self.policy.queue_timeout_s:g} s", retry_after=5
                    )
                self._check_open()
                head = True
        finally:
            if ticket is not None and ticket in self._waiters:
                self._waiters.remove(ticket)
            if head:
                self._wake_one()  # pass the turn on if this waiter leaves without a worker

    def _starved(self) -> bool:
        """Every worker is leased and the pool may not grow: only a released lease frees one."""
        alive = [w for w in self.workers if w.state is not WorkerState.DEAD]
        return len(alive) + self._spawning >= self.max_workers - self._reserved \
            and all(w.state is WorkerState.BUSY for w in alive) and len(self._waiters) > 0

    def _check_open(self) -> None:
        if self._closing or self.draining:
            raise errors.Unavailable("droidpool is shutting down", retry_after=5)

    async def _apply(self, decision: Assignment, want: Want) -> Worker | None:
        """Carry out a decision; None means the world changed meanwhile: decide again."""
        if decision.evict_id is not None:
            victim = self._by_id(decision.evict_id)
            if victim is None or victim.state is not WorkerState.IDLE:
                return None
            self.counters["evictions"] += 1
            log.info("pool.evict", worker=victim.id, session=victim.session_id)
            # The victim's slot passes to this request's new worker: nobody else may take it
            # between the victim's death and the spawn.
            self._reserved += 1
            try:
                await self._stop(victim)
                return await self._spawn_for(want)
            finally:
                self._reserved -= 1
        if decision.action == "take":
            worker = self._by_id(decision.worker_id)
            if worker is None or worker.state not in (WorkerState.READY, WorkerState.IDLE):
                return None
            was_spare = worker.state is WorkerState.READY
            worker.state = WorkerState.BUSY
            if was_spare:
                self._kick()
            try:
                await self._prepare(worker, want)
            except BaseException:
                await self._discard(worker)
                raise
            return worker
        return await self._spawn_for(want)

    async def _spawn_for(self, want: Want) -> Worker:
        self._check_backoff()
        worker = self._new_worker(want.settings.model_id)
        worker.state = WorkerState.BUSY
        self._add(worker)
        self.counters["spawns_on_request"] += 1
        try:
            await self._spawn(worker)
            if self.self_test == "pending" and not await self._self_test(worker):
                raise MintFailed(self.self_test)  # it loaded a session: not fresh; decide again
            await self._prepare(worker, want)
        except BaseException:
            await self._discard(worker)
            raise
        return worker

    async def _prepare(self, worker: Worker, want: Want) -> None:
        try:
            if want.session_id is not None:
                servers = want.servers_for(worker.mcp_servers)
                stale_servers = bool(want.mcp_servers) and worker.mcp_servers != list(want.mcp_servers)
                if worker.session_id != want.session_id or stale_servers:
                    await worker.load_session(want.session_id, self.policy.spawn_timeout_s, servers)
                    self.counters["session_loads"] += 1
                if want.settings.model_id and worker.model_id != want.settings.model_id:
                    await worker.set_model(want.settings.model_id)
                if want.settings.reasoning_effort:
                    await worker.set_reasoning_effort(want.settings.reasoning_effort)
            elif self.mode == "minted":
                await self._start_minted(worker, want)
            elif worker.settings != want.settings or worker.session_id is None or want.mcp_servers:
                # Safe only because this process has held no conversation (droid leaks old context).
                await worker.initialize(want.settings, self.policy.spawn_timeout_s,
                                        want.servers_for(worker.mcp_servers))
            self._remember_models(worker)
        except DroidRequestError as exc:
            if exc.code == SESSION_NOT_FOUND and want.session_id is not None:
                raise errors.SessionNotFound(f"droid has no session {want.session_id}") from None
            if want.session_id is None and self.mode == "minted":
                self._mint_broken(f"droid refused {exc.method} of a minted session: {exc.droid_message}")
                raise MintFailed(str(exc)) from None
            raise errors.UpstreamError(f"droid refused {exc.method}: {exc.droid_message}") from None

    async def _start_minted(self, worker: Worker, want: Want) -> None:
        """A new conversation in ``worker``: write its session, load it, check what droid holds."""
        settings = want.settings
        minted = sessions.mint(Path(self.spec.sessions_dir), Path(self.spec.cwd) / "sessions", settings,
                               self.spec.session_title)
        result = await worker.load_session(minted.session_id, self.policy.spawn_timeout_s,
                                           want.servers_for(worker.mcp_servers))
        problems = sessions.check_loaded(result, minted, settings)
        if problems:
            self._mint_broken("; ".join(problems))
            raise MintFailed("; ".join(problems))
        worker.adopt(settings, minted.cwd)
        self.counters["sessions_minted"] += 1

    async def _self_test(self, worker: Worker) -> bool:
        """Load a session written the way droidpool writes them, and check droid holds exactly
        it: one empty message, the system prompt written, its working directory."""
        marker = f"droidpool self-test {uuid.uuid4().hex}"
        settings = SessionSettings(model_id=self.base_settings.model_id, system_prompt=marker,
                                   autonomy="off", disabled_tool_ids=self.base_settings.disabled_tool_ids)
        try:
            minted = sessions.mint(Path(self.spec.sessions_dir), Path(self.spec.cwd) / "self-test", settings,
                                   self.spec.session_title)
            result = await worker.load_session(minted.session_id, self.policy.spawn_timeout_s)
            problems = sessions.check_loaded(result, minted, settings)
        except DroidRequestError as exc:
            problems = [f"droid refused droid.load_session: {exc.droid_message}"]
        except OSError as exc:
            problems = [f"cannot write a session in {self.spec.sessions_dir}: {exc}"]
        if problems:
            self._mint_broken("; ".join(problems))
            return False
        self.mode, self.self_test = "minted", "ok"
        log.info("pool.session_self_test", result="ok", mode=self.mode)
        return True

    def _mint_broken(self, why: str) -> None:
        """droid does not load minted sessions as written: fall back to a fresh process per new
        conversation, and retire the spares that are not fresh."""
        self.counters["session_self_test_failures"] += 1
        self.mode, self.self_test = "fresh", f"failed: {why}"
        log.error("pool.session_self_test", result="failed", reason=why, mode=self.mode,
                  consequence="each new conversation now needs a new droid process (~0.6 s)")
        for worker in self.workers:
            if worker.state is WorkerState.READY and worker.used:
                self._retire_soon(worker, "reconfigured")
        self._kick()

    def _release(self, worker: Worker) -> None:
        if worker.state is WorkerState.BUSY:
            worker.state = WorkerState.IDLE if worker.used else WorkerState.READY
        worker.last_used = time.monotonic()
        self._note_pressure(0)
        self._prune()
        self._wake_one()
        self._kick()

    def _note_pressure(self, arriving: int) -> None:
        busy = sum(1 for w in self.workers if w.state is WorkerState.BUSY)
        self._pressure.append((time.monotonic(), busy + len(self._waiters) + arriving))

    def peak(self, now: float) -> int:
        """The most requests running or waiting at once over the last ``DEMAND_WINDOW_S``."""
        return max((n for at, n in self._pressure if now - at <= DEMAND_WINDOW_S), default=0)

    async def _spawn(self, worker: Worker) -> None:
        """Start a process and wait until it answers; failures feed the backoff."""
        assert self._tg is not None
        self._spawning += 1
        self.counters["spawns"] += 1
        try:
            await worker.start(self._tg)
            with anyio.fail_after(self.policy.spawn_timeout_s):
                models = await worker.list_models(self.policy.spawn_timeout_s)
            if models:
                self.available_models = models
                self.models_listed.set()
        except (errors.DroidpoolError, DroidRequestError, TimeoutError) as exc:
            message = str(exc) if not isinstance(exc, TimeoutError) else (
                f"droid did not answer within {self.policy.spawn_timeout_s:g} s of starting"
            )
            tail = worker.stderr_tail(300)
            message = message if not tail or tail in message else f"{message}: {tail}"
            if worker.exit_code is not None and worker.exit_code < 0 and worker.state is not WorkerState.STOPPING:
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
            self._spawning -= 1
        self.spawn_failures = 0
        self.last_spawn_error = None

    def _check_backoff(self) -> None:
        if time.monotonic() < self._backoff_until:
            raise errors.Unavailable(
                f"droid workers are failing to start: {self.last_spawn_error}",
                retry_after=self._backoff_until - time.monotonic(),
            )

    async def _discard(self, worker: Worker) -> None:
        with anyio.CancelScope(shield=True):
            await worker.stop()
        self._prune()
        self._wake_one()
        self._kick()

    async def _stop(self, worker: Worker) -> None:
        await worker.stop()
        self._prune()

    def _add(self, worker: Worker) -> None:
        self.workers.append(worker)
        live = sum(1 for w in self.workers if w.state is not WorkerState.DEAD)
        self.peak_workers = max(self.peak_workers, live)

    def _new_worker(self, model_id: str | None) -> Worker:
        worker = self._factory(self.spec, model_id)
        worker.on_exit = self._on_worker_exit
        return worker

    def _on_worker_exit(self, worker: Worker) -> None:
        if worker.state is not WorkerState.STOPPING and not self._closing:
            self.counters["crashes"] += 1
        self._kick()
        self._wake_one()

    def _remember_models(self, worker: Worker) -> None:
        if worker.available_models:
            self.available_models = worker.available_models
            self.models_listed.set()

    def _by_id(self, worker_id: int | None) -> Worker | None:
        return next((w for w in self.workers if w.id == worker_id), None)

    def _prune(self) -> None:
        self.workers = [w for w in self.workers if w.state is not WorkerState.DEAD]

    def _wake_one(self) -> None:
        while self._waiters:
            event = self._waiters.popleft()
            if not event.is_set():
                event.set()
                return

    def _wake_all(self) -> None:
        while self._waiters:
            self._waiters.popleft().set()

    def _kick(self) -> None:
        self._wake_reconcile.set()

    # --- supervision -------------------------------------------------------------------------

    def plan(self) -> Plan:
        """The supervisor's next step (pure: see policy.reconcile)."""
        now = time.monotonic()
        defer = now - self._last_lease < GROWTH_DEFER_S and not self._waiters
        return reconcile(self.views(), self.policy, now, mode=self.mode, peak=self.peak(now),
                         in_flight=self._spawning, reserved=self._reserved, defer_growth=defer)

    def _measure(self) -> None:
        pids = {w.pid: w for w in self.workers if w.pid is not None and w.alive}
        for pgid, rss in procfs.group_rss(pids).items():
            pids[pgid].rss = rss

    def supervisor_alive(self, max_age_s: float) -> bool:
        return time.monotonic() - self._last_reconcile <= max_age_s

    async def _reconcile_loop(self) -> None:
        while True:
            self._last_reconcile = time.monotonic()
            self._prune()
            self._measure()
            if not self._closing and not self.draining:
                plan = self.plan()
                for stop in plan.stop:
                    worker = self._by_id(stop.worker_id)
                    if worker is not None:
                        self._retire_soon(worker, stop.reason)
                if time.monotonic() >= self._backoff_until:
                    for _ in range(plan.start):
                        worker = self._new_worker(self.base_settings.model_id)
                        self._add(worker)
                        assert self._tg is not None
                        self._tg.start_soon(self._start_spare, worker)
            with anyio.move_on_after(RECONCILE_EVERY_S):
                await self._wake_reconcile.wait()
            self._wake_reconcile = anyio.Event()

    def forget_session(self, session_id: str) -> None:
        """Another node ran turns on this session: a worker here that holds it is stale; retire it
        (the next turn loads the session from its restored files)."""
        for worker in self.workers:
            if worker.session_id == session_id:
                self._retire_soon(worker, "stale_session")

    def _retire_soon(self, worker: Worker, reason: StopReason) -> None:
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
        assert self._tg is not None
        self._tg.start_soon(self._stop, worker)

    async def _start_spare(self, worker: Worker) -> None:
        try:
            await self._spawn(worker)
            if self.self_test == "pending":
                if not await self._self_test(worker):
                    await self._discard(worker)  # it loaded a session: not a fresh spare
                    return
            elif self.mode == "fresh":
                await worker.initialize(self.base_settings, self.policy.spawn_timeout_s)
            self._remember_models(worker)
        except (errors.DroidpoolError, DroidRequestError, TimeoutError) as exc:
            log.warning("pool.spare_failed", worker=worker.id, error=str(exc))
            await self._discard(worker)
            return
        if worker.state is WorkerState.STARTING:
            worker.state = WorkerState.READY
            log.info("pool.spare_ready", worker=worker.id, pid=worker.pid, mode=self.mode)
        self._wake_one()
