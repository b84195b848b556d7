"""Runs turns on droid sessions: a task of the service owns each droid turn; requests attach to it.

A request asks for a turn; a driver task finds or creates its session (under the session's lock),
leases a worker and starts the droid turn, then hands the request a ``Turn`` to read. When the
request is done the driver releases everything and the turn's recorder settles it. A turn parked
on client tools (``core/parking.py``) keeps its driver until the request with the results, or
until its park ends.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.abc
import structlog

from droidpool import errors
from droidpool.droid.protocol import PermissionAsked
from droidpool.droid.spec import SessionSettings
from droidpool.pool.pool import Pool, Want
from droidpool.store.base import SessionRecord, SessionStore

from . import attachments, conversation, nodes
from .access import PUBLIC, Access
from .catalog import Catalog
from .ledger import Ledger
from .model import Message, ToolResult, TurnRequest
from .nodes import Cluster
from .output import Accumulator
from .parking import Parking, Run, ToolLimits
from .recorder import Books, Recorder
from .sessions import Sessions, key_lock
from .tools import ToolBroker, client_name
from .turn import Deadlines, Turn

log = structlog.get_logger(__name__)

NO_TOOLS_KEY = "\0none"  # the broker's entry with no tools: what a session without tools gets


@dataclass
class _Start:
    run: Run | None = None
    error: BaseException | None = None
    scope: anyio.CancelScope | None = None
    ready: anyio.Event = field(default_factory=anyio.Event)


class TurnService:
    """Runs turns on droid sessions: which session, which worker, and the turns' lives.
    ``async with service.running():`` owns their tasks."""

    def __init__(
        self,
        pool: Pool,
        store: SessionStore,
        base_settings: SessionSettings,
        catalog: Catalog,
        deadlines: Deadlines | None = None,
        broker: ToolBroker | None = None,
        tool_limits: ToolLimits | None = None,
        ledger: Ledger | None = None,
        cluster: Cluster | None = None,
        attachment_limits: attachments.Limits | None = None,
    ) -> None:
        self.pool = pool
        self.store = store
        self.base_settings = base_settings
        self.catalog = catalog
        self.deadlines = deadlines or Deadlines()
        self.broker = broker if broker is not None else ToolBroker()
        self.intake = attachments.Intake(attachment_limits or attachments.Limits(), catalog.sees_images, catalog.alias)
        self.ledger = ledger if ledger is not None else Ledger(store, catalog)
        self.cluster = cluster  # None: a single node
        self.counters: Counter[str] = Counter()
        self.sessions = Sessions(pool, store, base_settings)
        self.parking = Parking(tool_limits or ToolLimits(), self.broker, store, self.counters)
        self.books = Books(store, self.ledger, self.sessions, self.parking, cluster, self.counters)
        self._drivers: set[anyio.CancelScope] = set()  # every running turn's driver
        self._tg: anyio.abc.TaskGroup | None = None
        store.on_lock_loss(self._locks_lost)
        pool.on_starved = self.parking.yield_oldest

    @property
    def tool_limits(self) -> ToolLimits:
        return self.parking.limits

    @tool_limits.setter
    def tool_limits(self, limits: ToolLimits) -> None:
        self.parking.limits = limits

    @property
    def attachment_limits(self) -> attachments.Limits:
        return self.intake.limits

    @attachment_limits.setter
    def attachment_limits(self, limits: attachments.Limits) -> None:
        self.intake.limits = limits

    @property
    def parked(self) -> dict[str, Run]:
        return self.parking.parked

    @asynccontextmanager
    async def running(self) -> AsyncIterator[TurnService]:
        """Own the turns' tasks; on the way out, parked turns are interrupted and released."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self.parking.bind(tg)
            try:
                yield self
            finally:
                self._tg = None
                self.parking.bind(None)

    async def models_known(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until droid's model list is known: a client that lists the
        models at start-up should not see an empty list."""
        with anyio.move_on_after(timeout_s):
            await self.pool.models_listed.wait()
        return self.pool.models_listed.is_set()

    # --- a turn ------------------------------------------------------------------------------

    @asynccontextmanager
    async def turn(self, request: TurnRequest, access: Access = PUBLIC, *, local: bool = False) -> AsyncIterator[Turn]:
        """A turn for ``request``, to read in the block: a new droid turn, or the parked one the
        request brings tool results for.

        The session is the one named by ``request.session_id``, else the one whose latest turn
        is ``request.previous_turn_id``, else the one named by ``request.conversation_key``
        (created on first use), else the one whose history the request resends, else a new one.
        Leaving the block before the turn completes interrupts it; a turn that reached droid
        and was not recorded counts as failed. Before anything reaches droid, the model must have
        a price (or be allowed without one), the caller must be within its budgets, and what the
        request attaches must be fit for droid. With several nodes, a session held by another live
        node raises ``nodes.Forward`` (unless ``local``: a forwarded request, or one whose forward
        failed), and one held by no live node is taken over here.
        """
        if request.tools and request.tool_choice == "auto" and not self.broker.enabled:
            raise errors.InvalidRequest("Client tools are turned off on this server (tools.enabled = false); "
                                        "send the request without tools.", param="tools")
        if self.cluster is not None and not local:
            await nodes.forward_early(self.cluster, self.sessions, request, access)
        model_id, effort = self.catalog.resolve_with_effort(
            request.model, request.reasoning_effort, exact=request.effort_is_exact)
        if effort != request.reasoning_effort:
            request = dataclasses.replace(request, reasoning_effort=effort)
        self.ledger.check_model(model_id, access.allow_unpriced)
        await self.ledger.admit(access.owner)
        run = None
        if self.parking.parked:
            seed = conversation.seed(request.system, namespace=access.owner)
            run = await self.parking.resume(await self.sessions.candidate(request, seed, access), request, access,
                                            model_id, self.intake)
        if run is None:
            # What the new messages attach is checked before any lock or lease (and again in _open,
            # with the history's when a new session is given it).
            self.intake.checked(conversation.split(request.messages).new, request.model, model_id)
            run = await self._start(request, model_id, access, local)
        delivered = False
        try:
            yield run.turn
            delivered = not run.turn.client_gone
        finally:
            await self._leave(run, delivered)

    async def _start(self, request: TurnRequest, model_id: str, access: Access, local: bool) -> Run:
        if self._tg is None:
            raise errors.Unavailable("droidpool is shutting down", retry_after=5)
        start = _Start()
        self._tg.start_soon(self._drive, start, request, model_id, access, local)
        try:
            await start.ready.wait()
        except BaseException:
            if start.scope is not None:  # the request went away while its turn was being set up
                start.scope.cancel()
            raise
        if start.error is not None:
            raise start.error
        assert start.run is not None
        return start.run

    async def _drive(self, start: _Start, request: TurnRequest, model_id: str, access: Access, local: bool) -> None:
        """The task that owns one droid turn: its locks, its lease, the turn itself."""
        try:
            with anyio.CancelScope() as scope:
                start.scope = scope
                self._drivers.add(scope)
                async with AsyncExitStack() as stack:
                    run = await self._open(request, model_id, access, stack, local)
                    start.run = run
                    start.ready.set()
                    await run.release.wait()
        except Exception as exc:
            if start.run is None:
                start.error = exc
            else:
                log.exception("turn.driver_failed", session=start.run.turn.session_id)
        finally:
            if start.scope is not None:
                self._drivers.discard(start.scope)
            if start.run is None and start.error is None:
                start.error = errors.Unavailable("droidpool is shutting down", retry_after=5)
            if start.run is not None:
                start.run.finished.set()
            start.ready.set()

    async def _open(self, request: TurnRequest, model_id: str, access: Access, stack: AsyncExitStack,
                    local: bool = False) -> Run:
        """Find the session, lease a worker, start the droid turn (all held on ``stack``)."""
        split = conversation.split(request.messages)
        # Each owner's stateless histories live in their own digest space.
        seed = conversation.seed(request.system, namespace=access.owner)
        key = request.conversation_key
        if key is not None:
            # Held for the whole turn: a conversation id's first uses never race.
            await stack.enter_async_context(self.sessions.lock(key_lock(access.owner, key)))
        record = await self.sessions.continued(request, split, seed, access, stack)
        if record is not None and self.cluster is not None:
            await nodes.place(self.cluster, self.sessions, record, local)
        worker = None
        if record is not None:
            want = self._want(model_id, request, None, access, record.session_id)
            worker = await self.sessions.lease_continued(record, want, request, stack)
        if record is not None and worker is not None:
            session_id = record.session_id
            base = record.head_digest or seed
            sent: tuple[Message, ...] = split.new
            attached = self.intake.checked(sent, request.model, model_id)
            prompt = conversation.turn_text(split.new)
            if any(isinstance(p, ToolResult) for m in split.new for p in m.parts):
                self.counters["tool_results_fallback"] += 1
                log.warning("turn.tool_results_fallback", session=session_id,
                            why="no parked turn waits for them (expired, or its worker died): sent as a message")
            await self.store.begin_turn(session_id)
        else:
            record = None
            sent = (*split.history, *split.new)
            attached = self.intake.checked(sent, request.model, model_id)
            placeholder = f"\0new-{uuid.uuid4().hex}"
            want = self._want(model_id, request, request.system, access, placeholder)
            stack.callback(self.broker.forget, placeholder)  # renamed below if the session begins
            worker = await self.sessions.lease_new(want, request, access, stack)
            assert worker.session_id is not None
            session_id = worker.session_id
            if self.cluster is not None:
                await self.cluster.claim_new(session_id)
            self.broker.rename(placeholder, session_id)
            base = seed
            prompt = conversation.transcript_prompt(split.history, split.new)
        log.debug("turn.start", session=session_id, worker=worker.id, new=record is None, prompt=prompt)
        recorder = Recorder(self.books, request, access, session_id, model_id)
        stack.push_async_callback(recorder.settle)  # whatever happens from here, the turn is settled
        entry = self.broker.get(session_id)

        def park(asked: PermissionAsked) -> bool:
            return all(client_name(entry, use.name) is not None for use in asked.tool_uses)

        message = conversation.user_message(prompt, attached, request.output_format)
        stream = await stack.enter_async_context(worker.turn(message, self.deadlines.interrupt_grace_s, park))
        accumulator = Accumulator(client_name=lambda name: client_name(self.broker.get(session_id), name),
                                  structured=request.output_format is not None,
                                  sent_images=any(a.kind == "image" for a in attached))
        turn = Turn(turn_id=uuid.uuid4().hex, session_id=session_id, model_id=model_id, request=request,
                    access=access, worker=worker, stream=stream, recorder=recorder, deadlines=self.deadlines,
                    base=base, sent=sent, attached=(len(attached), sum(len(a.data) for a in attached)),
                    accumulator=accumulator)
        recorder.run = Run(turn)
        return recorder.run

    def _want(self, model_id: str, request: TurnRequest, system: str | None, access: Access, key: str) -> Want:
        """What the pool must give this turn, MCP servers included: a session with client tools
        gets its own server; one without, a server with no tools when the worker has another's."""
        settings = self._settings(model_id, request, system, access)
        if not self.broker.enabled:
            return Want(settings, session_id=None if key.startswith("\0") else key)
        tools = request.tools if request.tool_choice == "auto" else ()
        reset = (self.broker.server_param(self.broker.offer(NO_TOOLS_KEY, ())),)
        servers: tuple[dict[str, object], ...] = ()
        if tools or self.broker.get(key) is not None:
            servers = (self.broker.server_param(self.broker.offer(key, tools)),)
        return Want(settings, session_id=None if key.startswith("\0") else key, mcp_servers=servers, mcp_reset=reset)

    def _settings(self, model_id: str, request: TurnRequest, system: str | None, access: Access) -> SessionSettings:
        base = self.base_settings
        return SessionSettings(
            model_id=model_id,
            system_prompt=system or None,
            reasoning_effort=request.reasoning_effort,
            autonomy=access.autonomy or base.autonomy,
            disabled_tool_ids=base.disabled_tool_ids if access.disabled_tool_ids is None else access.disabled_tool_ids,
        )

    async def _leave(self, run: Run, delivered: bool) -> None:
        """The request is done with its turn: release it, or keep it parked for the results (only
        if its client got the calls: a client gone, or a failed write, releases it at once)."""
        if run.turn.parked and not delivered:
            self.counters["park_undelivered"] += 1
            log.info("turn.park_undelivered", session=run.turn.session_id)
        elif run.turn.parked and self.parking.hold(run):
            return
        run.release.set()
        with anyio.CancelScope(shield=True):
            await run.finished.wait()

    def _locks_lost(self) -> None:
        """The store lost this node's cross-node locks: another node may enter any session now, so
        every turn here stops (interrupted, as if its client had gone) rather than run beside it."""
        self.counters["lock_loss_interrupts"] += len(self._drivers)
        log.error("turn.locks_lost", interrupted=len(self._drivers))
        for scope in list(self._drivers):
            scope.cancel()

    # --- sessions ----------------------------------------------------------------------------

    async def release_session(self, session_id: str) -> None:
        await self.parking.release_session(session_id)

    async def fork(self, session_id: str, conversation_key: str | None = None, access: Access = PUBLIC) -> SessionRecord:
        await self.parking.release_session(session_id)
        if self.cluster is None:
            return await self.sessions.fork(session_id, conversation_key, access)
        cluster, sessions = self.cluster, self.sessions

        async def prepare(source: SessionRecord) -> None:
            await nodes.place(cluster, sessions, source, local=True)  # the source's files here, whoever held it

        async def forked(fork_id: str) -> None:
            await cluster.claim_new(fork_id)
            await cluster.keep_files(fork_id)

        return await self.sessions.fork(session_id, conversation_key, access, prepare=prepare, forked=forked)

    async def sweep(self) -> int:
        """What the daemon's sweep loop asks every few minutes: expired sessions leave the store,
        and their client tools the broker (a parked turn's stay); how many sessions went."""
        swept = await self.store.sweep()
        live = {session_id for session_id, alive in (await self.store.all_ids()).items() if alive}
        self.broker.retain(live, keep=self.parking.parked)
        return swept

    async def delete(self, session_id: str, access: Access = PUBLIC) -> bool:
        await self.parking.release_session(session_id)
        deleted = await self.sessions.delete(session_id, access)
        if deleted:
            self.broker.forget(session_id)
            if self.cluster is not None:
                self.cluster.forget(session_id)
        return deleted
