"""Runs turns on droid sessions: a task of the service owns each droid turn; requests attach to it.

A request asks for a turn; a driver task finds or creates its session (under the session's lock),
leases a worker and starts the droid turn, then hands the request a ``Turn`` to read. When the
request is done the driver releases everything. When the LLM calls client tools, droid waits for
permission with no timeout: the turn is *parked* there, the request answers with the calls, and
the driver keeps the lease, the locks and the open droid turn until the request that brings the
results (it is resumed: permission granted, droid's MCP calls are answered with the results), or
until the park expires (``tools.park_timeout_s``: interrupted).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.abc
import structlog

from droidpool import errors
from droidpool.droid.protocol import PermissionAsked, Usage
from droidpool.droid.worker import SessionSettings
from droidpool.pool.pool import Pool, Want
from droidpool.store.base import SessionRecord, SessionStore, TurnRow

from . import attachments, conversation
from .access import PUBLIC, Access
from .catalog import Catalog
from .ledger import Ledger
from .model import Attachment, Message, Text, ToolResult, TurnRequest, TurnResult
from .nodes import Cluster, Forward, route
from .output import Accumulator
from .pricing import Cost
from .sessions import Sessions, key_lock
from .tools import LLM_PREFIX, ToolBroker, client_name
from .turn import Deadlines, Turn, to_the_end

log = structlog.get_logger(__name__)

NO_TOOLS_KEY = "\0none"  # the broker's entry with no tools: what a session without tools gets


@dataclass(frozen=True)
class ToolLimits:
    park_timeout_s: float = 300.0
    max_parked: int = 64
    max_parked_per_key: int = 8


@dataclass
class Run:
    """One droid turn's driver: the request currently reading it, and how it ends."""

    turn: Turn
    refused: bool = False  # its results could not be taken (what they attach): released at once
    parked_at: float = 0.0  # when it began to wait for its results (monotonic)
    release: anyio.Event = field(default_factory=anyio.Event)  # no request will read it again
    finished: anyio.Event = field(default_factory=anyio.Event)  # everything it held is released
    expiry: anyio.CancelScope | None = None


@dataclass
class _Start:
    run: Run | None = None
    error: BaseException | None = None
    scope: anyio.CancelScope | None = None
    ready: anyio.Event = field(default_factory=anyio.Event)


class TurnService:
    """Runs turns on droid sessions: which session, which worker, the store's bookkeeping, and
    the turns parked on client tools. ``async with service.running():`` owns their tasks."""

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
        self.attachment_limits = attachment_limits or attachments.Limits()
        self.store = store
        self.base_settings = base_settings
        self.catalog = catalog
        self.deadlines = deadlines or Deadlines()
        self.broker = broker if broker is not None else ToolBroker()
        self.tool_limits = tool_limits or ToolLimits()
        self.ledger = ledger if ledger is not None else Ledger(store, catalog)
        self.cluster = cluster  # None: a single node
        self._drivers: set[anyio.CancelScope] = set()  # every running turn's driver
        store.on_lock_loss(self._locks_lost)
        pool.on_starved = self._yield_parked
        self.sessions = Sessions(pool, store, base_settings)
        self.parked: dict[str, Run] = {}  # session id → its parked turn
        self.counters: Counter[str] = Counter()
        self._tg: anyio.abc.TaskGroup | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[TurnService]:
        """Own the turns' tasks; on the way out, parked turns are interrupted and released."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                yield self
            finally:
                self._tg = None
                for run in list(self.parked.values()):
                    run.release.set()
                    if run.expiry is not None:
                        run.expiry.cancel()
                self.parked.clear()

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
        and was not recorded counts as failed (``store.fail_turn``). Before anything reaches
        droid, the model must have a price (or be allowed without one) and the caller must be
        within its budgets. With several nodes, a session held by another live node raises
        ``Forward`` (unless ``local``: a forwarded request, or one whose forward failed), and one
        held by no live node is taken over here.
        """
        if request.tools and request.tool_choice == "auto" and not self.broker.enabled:
            raise errors.InvalidRequest("Client tools are turned off on this server (tools.enabled = false); "
                                        "send the request without tools.", param="tools")
        if self.cluster is not None and not local:
            await self._forward_early(request, access)
        model_id, effort = self.catalog.resolve_with_effort(
            request.model, request.reasoning_effort, exact=request.effort_is_exact)
        if effort != request.reasoning_effort:
            request = dataclasses.replace(request, reasoning_effort=effort)
        self.ledger.check_model(model_id, access.allow_unpriced)
        await self.ledger.admit(access.owner)
        run = await self._resume(request, access, model_id)
        if run is None:
            # What the new messages attach is checked before any lock or lease (and again in _open,
            # with the history's when a new session is given it).
            self._attachments(conversation.split(request.messages).new, request, model_id)
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
            await self._place(record, local)
        worker = None
        if record is not None:
            want = self._want(model_id, request, None, access, record.session_id)
            worker = await self.sessions.lease_continued(record, want, request, stack)
        if record is not None and worker is not None:
            session_id = record.session_id
            base = record.head_digest or seed
            sent: tuple[Message, ...] = split.new
            attached = self._attachments(sent, request, model_id)
            prompt = conversation.turn_text(split.new)
            if any(isinstance(p, ToolResult) for m in split.new for p in m.parts):
                self.counters["tool_results_fallback"] += 1
                log.warning("turn.tool_results_fallback", session=session_id,
                            why="no parked turn waits for them (expired, or its worker died): sent as a message")
            await self.store.begin_turn(session_id)
        else:
            record = None
            sent = (*split.history, *split.new)
            attached = self._attachments(sent, request, model_id)
            placeholder = f"\0new-{uuid.uuid4().hex}"
            want = self._want(model_id, request, request.system, access, placeholder)
            worker = await self.sessions.lease_new(want, request, access, stack)
            assert worker.session_id is not None
            session_id = worker.session_id
            if self.cluster is not None:
                await self.cluster.claim_new(session_id)
            self.broker.rename(placeholder, session_id)
            base = seed
            prompt = conversation.transcript_prompt(split.history, split.new)
        log.debug("turn.start", session=session_id, worker=worker.id, new=record is None, prompt=prompt)
        runs: list[Run] = []
        stack.push_async_callback(self._settle_run, runs, request, access, session_id, model_id)
        entry = self.broker.get(session_id)

        def park(asked: PermissionAsked) -> bool:
            return all(client_name(entry, use.name) is not None for use in asked.tool_uses)

        message = conversation.user_message(prompt, attached, request.output_format)
        stream = await stack.enter_async_context(worker.turn(message, self.deadlines.interrupt_grace_s, park))
        turn = Turn(uuid.uuid4().hex, session_id, worker, record is None, request, access, base, sent, stream,
                    self.deadlines, self._complete, self._park,
                    Accumulator(client_name=lambda name: client_name(self.broker.get(session_id), name),
                                structured=request.output_format is not None,
                                sent_images=any(a.kind == "image" for a in attached)),
                    model_id=model_id, attached=(len(attached), sum(len(a.data) for a in attached)))
        runs.append(Run(turn))
        return runs[0]

    def _attachments(self, messages: tuple[Message, ...], request: TurnRequest, model_id: str) -> list[Attachment]:
        """What ``messages`` attach, checked for droid (a 400 naming the part otherwise). For a model
        that cannot see images, a tool's image is left out (droid is told so in its place) rather
        than refused: an agent cannot choose what its tools return."""
        sees = self.catalog.sees_images(model_id)
        items = conversation.attachments(messages)
        if not sees:
            items = [a for a in items if not attachments.tool_image(a, messages)]
        shown = request.model if self.catalog.alias(request.model) == model_id else f"{request.model} ({model_id})"
        return attachments.check(items, self.attachment_limits, model=shown, sees_images=sees)

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

    async def _leave(self, run: Run, delivered: bool) -> None:
        """The request is done with its turn: release it, or keep it parked for the results (only
        if its client got the calls: a client gone, or a failed write, releases it at once)."""
        turn = run.turn
        if turn.parked and not delivered:
            self.counters["park_undelivered"] += 1
            log.info("turn.park_undelivered", session=turn.session_id)
        elif turn.parked and not run.release.is_set() and self._tg is not None:
            self.parked[turn.session_id] = run
            run.parked_at = time.monotonic()
            run.expiry = anyio.CancelScope()
            self._tg.start_soon(self._expire, run)
            return
        run.release.set()
        with anyio.CancelScope(shield=True):
            await run.finished.wait()

    # --- parking ------------------------------------------------------------------------------

    async def _park(self, turn: Turn) -> TurnResult:
        """The LLM called client tools and droid waits for permission: record the turn as far as
        the calls (the client resends them with the results) and keep it open."""
        owner_parked = sum(1 for r in self.parked.values() if r.turn.access.owner == turn.access.owner)
        limits = self.tool_limits
        if len(self.parked) >= limits.max_parked or owner_parked >= limits.max_parked_per_key:
            assert turn.accumulator.permission is not None
            await turn.worker.answer_permission(turn.accumulator.permission.request_id, "cancel")
            self.counters["park_refused"] += 1
            raise errors.Overloaded(
                f"Too many turns wait for client tool results ({len(self.parked)} in all, {owner_parked} of "
                "this key's); send the results of the pending ones first.", code="parked_limit", retry_after=5)
        acc = turn.accumulator
        cost = self.ledger.cost(turn.model_id or turn.request.model, acc.usage)
        result = TurnResult(turn.turn_id, turn.session_id, turn.request.model, acc.text, acc.reasoning, acc.usage,
                            turn.created, stop="tool_calls", tool_calls=tuple(acc.tool_calls),
                            standard_tokens=cost.standard_tokens)
        answer = Message("assistant", (Text(acc.text), *acc.tool_calls))
        await self._record(turn, result, answer, cost, parks=True)
        self.counters["parked"] += 1
        log.info("turn.parked", session=turn.session_id, calls=[c.name for c in acc.tool_calls])
        return result

    def _yield_parked(self) -> bool:
        """A request waits for a worker and none is free: the turn parked longest gives its worker
        up (interrupted, recorded ``park_ended``); its results, if they come, continue the session
        as a message. True if one did."""
        if not self.parked or self._tg is None:
            return False
        run = min(self.parked.values(), key=lambda r: r.parked_at)
        del self.parked[run.turn.session_id]
        self.counters["park_yielded"] += 1
        log.info("turn.park_yielded", session=run.turn.session_id,
                 parked_s=round(time.monotonic() - run.parked_at, 3))
        self._tg.start_soon(self._unpark, run)
        return True

    async def _expire(self, run: Run) -> None:
        assert run.expiry is not None
        with run.expiry:
            await anyio.sleep(self.tool_limits.park_timeout_s)
            if self.parked.get(run.turn.session_id) is run:
                del self.parked[run.turn.session_id]
                self.counters["park_expired"] += 1
                log.warning("turn.park_expired", session=run.turn.session_id, after_s=self.tool_limits.park_timeout_s)
                run.release.set()

    async def _resume(self, request: TurnRequest, access: Access, model_id: str) -> Run | None:
        """The parked turn this request brings the results for, carried on; None if there is
        none (a request for a session with a parked turn but no results cancels that turn)."""
        if not self.parked:
            return None
        seed = conversation.seed(request.system, namespace=access.owner)
        session_id = await self.sessions.candidate(request, seed, access)
        run = self.parked.get(session_id) if session_id is not None else None
        if run is None or run.turn.access.owner != access.owner:
            return None
        new = conversation.split(request.messages).new
        results = [p for m in new for p in m.parts if isinstance(p, ToolResult)]
        parked = run.turn
        calls = parked.accumulator.tool_calls
        if not results:  # the client moved on without the results: droid's calls are cancelled
            await self._unpark(run)
            return None
        wanted, got = {c.id for c in calls}, {r.call_id for r in results}
        if wanted != got:
            raise errors.InvalidRequest(
                f"The tool results answer {sorted(got)}, but the pending calls are {sorted(wanted)}: "
                "send one result for each of them.", param="messages")
        try:
            checked = {a.sha256: a for a in self._attachments(new, request, parked.model_id or model_id)}
        except errors.InvalidRequest as exc:
            # No retry of these results can succeed: the turn gives its worker back now.
            run.refused = True
            self.counters["resume_refused"] += 1
            log.info("turn.resume_refused", session=parked.session_id, why=exc.message)
            await self._unpark(run)
            raise
        new = attachments.replaced(new, lambda a: checked.get(a.sha256, a))  # the types their bytes say
        if not self.catalog.sees_images(parked.model_id or model_id):
            new = attachments.without_tool_images(new)
        results = [p for m in new for p in m.parts if isinstance(p, ToolResult)]
        permission = parked.accumulator.permission
        assert permission is not None
        by_id = {r.call_id: r for r in results}
        text = "\n\n".join(p.text for m in new for p in m.parts if isinstance(p, Text) and p.text.strip())
        if text:  # droid cannot take a message mid-turn: the client's words go with the last result
            last = by_id[permission.tool_uses[-1].id]
            by_id[last.call_id] = ToolResult(last.call_id, f"{last.content}\n\n[The user added: {text}]",
                                             last.is_error, last.attachments)
        added = tuple(p for m in new if m.role != "tool" for p in m.parts if isinstance(p, Attachment))
        if added:  # images beside the results (not in one) go with the last result too
            last = by_id[permission.tool_uses[-1].id]
            by_id[last.call_id] = ToolResult(last.call_id, last.content, last.is_error, (*last.attachments, *added))
        del self.parked[parked.session_id]
        if run.expiry is not None:
            run.expiry.cancel()
        self.broker.supply(parked.session_id, [(use.name.removeprefix(LLM_PREFIX), use.input, by_id[use.id])
                                               for use in permission.tool_uses])
        try:
            await self.store.begin_turn(parked.session_id)
            run.turn = parked.resumed(uuid.uuid4().hex, request, access, tuple(new))
            run.turn.attached = (len(checked), sum(len(a.data) for a in checked.values()))
            self.counters["resumed"] += 1
            log.info("turn.resumed", session=parked.session_id, results=len(results))
            await parked.worker.answer_permission(permission.request_id, "proceed_once")
        except BaseException:
            run.release.set()  # its request went away (or droid did) before the turn went on: release it
            raise
        return run

    async def _unpark(self, run: Run) -> None:
        self.parked.pop(run.turn.session_id, None)
        if run.expiry is not None:
            run.expiry.cancel()
        run.release.set()
        with anyio.CancelScope(shield=True):
            await run.finished.wait()

    async def release_session(self, session_id: str) -> None:
        """A parked turn on ``session_id`` gives up its locks (before a delete or a fork)."""
        run = self.parked.get(session_id)
        if run is not None:
            await self._unpark(run)

    # --- the store's bookkeeping ----------------------------------------------------------------

    async def _complete(self, turn: Turn) -> TurnResult:
        """Store the session's new head (its history now ends with this answer) and the turn."""
        acc = turn.accumulator
        if acc.saw_tool_search:
            self.counters["tools_deferred"] += 1
            log.warning("turn.client_tools_deferred", session=turn.session_id,
                        detail="droid hid the client tools behind ToolSearch: an extra LLM round trip")
        cost = self.ledger.cost(turn.model_id or turn.request.model, acc.usage)
        result = TurnResult(turn.turn_id, turn.session_id, turn.request.model, acc.text, acc.reasoning,
                            acc.usage, turn.created, standard_tokens=cost.standard_tokens)
        await self._record(turn, result, Message.of("assistant", acc.text), cost)
        return result

    async def _record(self, turn: Turn, result: TurnResult, answer: Message, cost: Cost, *,
                      parks: bool = False) -> None:
        """Store the turn and its session's new head; all of it, or none of it: a client that hangs
        up meanwhile does not cut it short (the turn then counts once, as recorded)."""
        head = conversation.extend(turn.base, (*turn.sent, answer))
        kept = {"result": result.to_json(), "echo": dict(turn.request.echo)} if turn.request.keep_output else None
        row = self.ledger.priced_row(TurnRow(
            turn.turn_id, turn.session_id, turn.request.model, result.usage, turn.started_at, turn.access.owner,
            turn.request.dialect, kept, droid_model=turn.model_id, conversation_key=turn.request.conversation_key,
            attachments=turn.attached[0], attachment_bytes=turn.attached[1]), cost)

        async def write() -> None:
            with anyio.CancelScope(shield=True):
                await self.store.complete_turn(row, head)
                await self._save_files(turn.session_id)
            self.ledger.recorded(row)
            turn.head = head
            turn.ledger_row = row
            turn.parked = parks

        await to_the_end(write())

    async def _settle_run(self, runs: list[Run], request: TurnRequest, access: Access, session_id: str,
                          model_id: str) -> None:
        """A turn that reached droid and was not recorded failed: keep its usage, and keep
        stateless resends off the session, whose droid history now holds the failed message.
        A parked turn that ended without its results (expired, cancelled, shut down) keeps the
        session as it is: the results, if they come, go to droid as a message."""
        turn = runs[0].turn if runs else None
        if turn is not None and turn.ledger_row is not None and not turn.parked:
            return  # recorded (even if its request was cancelled just after)
        usage = turn.spent if turn is not None else Usage()
        asked = turn.request if turn else request
        # A parked turn's row was written when it parked (with no usage yet: droid reports it when
        # the droid turn ends): how it ended is a row of its own, with what droid then reported.
        row = self.ledger.priced_row(TurnRow(
            turn.turn_id if turn and not turn.parked else uuid.uuid4().hex, session_id, asked.model, usage,
            turn.started_at if turn else time.time(), access.owner, asked.dialect,
            status=("resume_refused" if runs and runs[0].refused else "park_ended") if turn is not None and turn.parked
            else "failed",
            droid_model=model_id, conversation_key=asked.conversation_key,
            attachments=turn.attached[0] if turn else 0, attachment_bytes=turn.attached[1] if turn else 0),
            self.ledger.cost(model_id, usage))
        diverge = not (turn is not None and turn.parked)
        with anyio.CancelScope(shield=True):
            if turn is not None and not turn.parked and not turn.worker.alive and self.pool.spec.sessions_dir:
                # Its droid died mid-turn: droid's file keeps the user message the client got no
                # answer to. Cut it, and the session stays as the client knows it.
                await self.sessions.forget_unanswered(session_id)
                diverge = False
            await self.store.fail_turn(row, diverge=diverge)
            await self._save_files(session_id)
        self.ledger.recorded(row)
        log.info("turn.failed" if row.status == "failed" else "turn.park_ended", session=session_id)

    # --- several nodes -------------------------------------------------------------------------

    def _locks_lost(self) -> None:
        """The store lost this node's cross-node locks: another node may enter any session now, so
        every turn here stops (interrupted, as if its client had gone) rather than run beside it."""
        self.counters["lock_loss_interrupts"] += len(self._drivers)
        log.error("turn.locks_lost", interrupted=len(self._drivers))
        for scope in list(self._drivers):
            scope.cancel()

    async def _forward_early(self, request: TurnRequest, access: Access) -> None:
        """A session another live node holds: forward at once, before any lock or budget check
        here (the holder does them). A race with a move is settled by ``_place``, under the lock."""
        assert self.cluster is not None
        record = await self.sessions.peek(request, conversation.seed(request.system, namespace=access.owner), access)
        if record is None or record.node_id in (None, self.cluster.node_id) or record.owner != access.owner:
            return
        decision = route(record.node_id, self.cluster.node_id, self.cluster.nodes, self.cluster.clock(),
                         self.cluster.dead_after_s)
        if decision.route == "forward":
            assert decision.url is not None and decision.holder is not None
            self.cluster.counters["forwards"] += 1
            raise Forward(decision.url, decision.holder)

    async def _place(self, record: SessionRecord, local: bool) -> None:
        """Run here, forward to the node holding the session, or take it over (under its lock)."""
        assert self.cluster is not None
        decision = await self.cluster.decide(record.node_id)
        if decision.route == "forward" and not local:
            assert decision.url is not None and decision.holder is not None
            self.cluster.counters["forwards"] += 1
            raise Forward(decision.url, decision.holder)
        moved = decision.route != "local" or record.node_id != self.cluster.node_id
        if moved and await self.cluster.take_over(record.session_id, record.node_id):
            self.pool.forget_session(record.session_id)  # a worker here may hold an older copy

    async def _save_files(self, session_id: str) -> None:
        """With several nodes, droid's files of the session go to the store after every turn."""
        if self.cluster is None:
            return
        try:
            await self.cluster.save(session_id)
        except Exception as exc:  # noqa: BLE001 - the turn stands; another node may lack it
            self.cluster.counters["files_save_failed"] += 1
            log.error("nodes.files_save_failed", session=session_id, error=str(exc))

    # --- sessions ----------------------------------------------------------------------------

    async def fork(self, session_id: str, conversation_key: str | None = None, access: Access = PUBLIC) -> SessionRecord:
        await self.release_session(session_id)
        if self.cluster is None:
            return await self.sessions.fork(session_id, conversation_key, access)
        cluster = self.cluster

        async def prepare(source: SessionRecord) -> None:
            await self._place(source, local=True)  # the source's files here, whoever held it

        async def forked(fork_id: str) -> None:
            await cluster.claim_new(fork_id)
            await self._save_files(fork_id)

        return await self.sessions.fork(session_id, conversation_key, access, prepare=prepare, forked=forked)

    async def delete(self, session_id: str, access: Access = PUBLIC) -> bool:
        await self.release_session(session_id)
        deleted = await self.sessions.delete(session_id, access)
        if deleted:
            self.broker.forget(session_id)
            if self.cluster is not None:
                self.cluster.forget(session_id)
        return deleted

    def _settings(self, model_id: str, request: TurnRequest, system: str | None, access: Access) -> SessionSettings:
        base = self.base_settings
        return SessionSettings(
            model_id=model_id,
            system_prompt=system or None,
            reasoning_effort=request.reasoning_effort,
            autonomy=access.autonomy or base.autonomy,
            disabled_tool_ids=base.disabled_tool_ids if access.disabled_tool_ids is None else access.disabled_tool_ids,
        )
