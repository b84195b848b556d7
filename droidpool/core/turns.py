"""A turn's path: find or create its droid session, lease a worker, run the turn; it records itself."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import anyio
import structlog

from droidpool import errors
from droidpool.droid.protocol import TextDelta, ThinkingDelta, TurnEvent, Usage
from droidpool.droid.worker import DroidRequestError, SessionSettings, TurnStream, Worker
from droidpool.pool.pool import Pool, Want
from droidpool.store.base import SessionRecord, SessionStore, TurnRow

from . import conversation
from .access import PUBLIC, Access
from .catalog import Catalog
from .model import Message, Output, TurnRequest, TurnResult
from .output import Accumulator

log = structlog.get_logger(__name__)

KEY_LOCK = "conversation-id:"  # pool.session_lock namespace for conversation ids


@dataclass
class Deadlines:
    first_token_s: float = 120.0
    turn_s: float = 900.0
    interrupt_grace_s: float = 3.0


@dataclass
class Turn:
    """A running turn. ``outputs()`` streams it under its deadlines; when droid completes it,
    it is recorded before the last output is handed over, and ``result`` is set. A turn that
    fails raises its error from ``outputs()``; one left unfinished is settled as failed."""

    turn_id: str
    session_id: str
    worker: Worker
    new_session: bool
    request: TurnRequest
    _stream: TurnStream
    _deadlines: Deadlines
    _record: Callable[[Turn], Awaitable[TurnResult]] | None = field(default=None, repr=False)
    accumulator: Accumulator = field(default_factory=Accumulator)
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    result: TurnResult | None = None

    @property
    def usage(self) -> Usage:
        return self.accumulator.usage

    @property
    def ttft_s(self) -> float | None:
        return self.first_token_at - self.started if self.first_token_at is not None else None

    async def outputs(self, tick_s: float) -> AsyncIterator[Output | None]:
        """What to send, as droid produces it; None after ``tick_s`` of silence (keep-alive)."""
        async for event in self._events(tick_s):
            if event is None:
                yield None
                continue
            for output in self.accumulator.feed(event):
                yield output
        failure = self.accumulator.failure()
        if failure is not None:
            raise failure
        if self._record is not None:
            self.result = await self._record(self)

    async def _events(self, tick_s: float) -> AsyncIterator[TurnEvent | None]:
        while True:
            now = time.monotonic()
            deadline = self.started + self._deadlines.turn_s
            if self.first_token_at is None:
                deadline = min(deadline, self.started + self._deadlines.first_token_s)
            wait = min(tick_s, deadline - now)
            if wait <= 0:
                which = "first token" if self.first_token_at is None else "turn"
                limit = self._deadlines.first_token_s if self.first_token_at is None else self._deadlines.turn_s
                raise errors.DeadlineExceeded(f"droid exceeded the {which} deadline of {limit:g} s")
            event: TurnEvent | None = None
            with anyio.move_on_after(wait):
                try:
                    event = await self._stream.__anext__()
                except StopAsyncIteration:
                    return
            if event is None:
                if time.monotonic() >= deadline:
                    continue
                yield None
                continue
            if self.first_token_at is None and isinstance(event, TextDelta | ThinkingDelta):
                self.first_token_at = time.monotonic()
            yield event


class TurnService:
    """Runs turns on droid sessions: which session, which worker, and the store's bookkeeping."""

    def __init__(
        self,
        pool: Pool,
        store: SessionStore,
        base_settings: SessionSettings,
        catalog: Catalog,
        deadlines: Deadlines | None = None,
    ) -> None:
        self.pool = pool
        self.store = store
        self.base_settings = base_settings
        self.catalog = catalog
        self.deadlines = deadlines or Deadlines()

    # --- a turn ------------------------------------------------------------------------------

    @asynccontextmanager
    async def turn(self, request: TurnRequest, access: Access = PUBLIC) -> AsyncIterator[Turn]:
        """Find the session, lease a worker, start the turn; the block consumes its outputs.

        The session is the one named by ``request.session_id``, else the one whose latest turn
        is ``request.previous_turn_id``, else the one named by ``request.conversation_key``
        (created on first use), else the one whose history the request resends, else a new one.
        Leaving the block before the turn completes interrupts it; a turn that reached droid
        and was not recorded counts as failed (``store.fail_turn``).
        """
        model_id, effort = self.catalog.resolve_with_effort(
            request.model, request.reasoning_effort, exact=request.effort_is_exact)
        if effort != request.reasoning_effort:
            request = dataclasses.replace(request, reasoning_effort=effort)
        split = conversation.split(request.messages)
        # Each owner's stateless histories live in their own digest space.
        seed = conversation.seed(request.system, namespace=access.owner)
        key = request.conversation_key
        async with AsyncExitStack() as stack:
            if key is not None:
                # Held for the whole turn: a conversation id's first uses never race.
                await stack.enter_async_context(self.pool.session_lock(f"{KEY_LOCK}{access.owner}\0{key}"))
            record = await self._continued(request, split, seed, access, stack)
            worker = None
            if record is not None:
                worker = await self._lease_continued(record, model_id, request, access, stack)
            if record is not None and worker is not None:
                session_id = record.session_id
                base = record.head_digest or seed
                sent: tuple[Message, ...] = split.new
                prompt = conversation.turn_text(split.new)
                await self.store.begin_turn(session_id)
            else:
                record = None
                worker = await self._lease_new(model_id, request, access, stack)
                assert worker.session_id is not None
                session_id = worker.session_id
                base = seed
                sent = (*split.history, *split.new)
                prompt = conversation.transcript_prompt(split.history, split.new)
            turn_id = uuid.uuid4().hex
            started_at = time.time()
            log.debug("turn.start", session=session_id, worker=worker.id, new=record is None, prompt=prompt)
            started: list[Turn] = []

            async def record_turn(turn: Turn) -> TurnResult:
                return await self._complete(turn, base, sent, access, started_at)

            async def settle() -> None:
                if not started or started[0].result is None:
                    usage = started[0].usage if started else Usage()
                    await self._settle(turn_id, session_id, request, access, started_at, usage)

            stack.push_async_callback(settle)
            stream = await stack.enter_async_context(worker.turn(prompt, self.deadlines.interrupt_grace_s))
            turn = Turn(turn_id, session_id, worker, record is None, request, stream, self.deadlines, record_turn,
                        created=int(started_at))
            started.append(turn)
            yield turn

    async def _complete(
        self, turn: Turn, base: str, sent: tuple[Message, ...], access: Access, started_at: float
    ) -> TurnResult:
        """Store the session's new head (its history now ends with this answer) and the turn."""
        acc = turn.accumulator
        result = TurnResult(turn.turn_id, turn.session_id, turn.request.model, acc.text, acc.reasoning,
                            acc.usage, turn.created)
        head = conversation.extend(base, (*sent, Message.of("assistant", acc.text)))
        kept = {"result": result.to_json(), "echo": dict(turn.request.echo)} if turn.request.keep_output else None
        row = TurnRow(turn.turn_id, turn.session_id, turn.request.model, acc.usage, started_at, access.owner,
                      turn.request.dialect, kept)
        with anyio.CancelScope(shield=True):
            await self.store.complete_turn(row, head)
        return result

    async def _settle(
        self, turn_id: str, session_id: str, request: TurnRequest, access: Access, started_at: float, usage: Usage
    ) -> None:
        """A turn that reached droid and was not recorded failed: keep its usage, and keep
        stateless resends off the session, whose droid history now holds the failed message."""
        row = TurnRow(turn_id, session_id, request.model, usage, started_at, access.owner, request.dialect,
                      status="failed")
        with anyio.CancelScope(shield=True):
            await self.store.fail_turn(row)
        log.info("turn.failed", session=session_id)

    async def _lease_continued(
        self, record: SessionRecord, model_id: str, request: TurnRequest, access: Access, stack: AsyncExitStack
    ) -> Worker | None:
        """A worker holding ``record``'s session; None if droid lost it and the client resent
        its whole history (so a new session loses nothing)."""
        want = Want(self._settings(model_id, request, None, access), session_id=record.session_id)
        try:
            return await stack.enter_async_context(self.pool.lease(want))
        except errors.SessionNotFound:
            # droid lost the session (its files were removed): forget it too.
            log.warning("turn.session_lost", session=record.session_id)
            await self.store.delete(record.session_id)
            named = request.session_id is not None or request.previous_turn_id is not None
            if not named and record.conversation_key is None:
                return None
            raise errors.SessionNotFound(
                f"droid no longer has session {record.session_id!r}; it is forgotten, "
                "and the next request starts a new one.",
                param="session_id" if request.session_id is not None else (
                    "previous_turn" if request.previous_turn_id is not None else "conversation_id"),
            ) from None

    async def _lease_new(
        self, model_id: str, request: TurnRequest, access: Access, stack: AsyncExitStack
    ) -> Worker:
        """A worker with a new session, recorded (named by the conversation key) with a turn in flight."""
        settings = self._settings(model_id, request, request.system, access)
        worker = await stack.enter_async_context(self.pool.lease(Want(settings)))
        assert worker.session_id is not None
        key = request.conversation_key
        if not await self.store.create(worker.session_id, request.model, conversation_key=key, in_flight=True,
                                       owner=access.owner):
            raise errors.ConversationConflict(  # only if another process took the id meanwhile
                f"The conversation id {key!r} names another session.", param="conversation_id"
            )
        await stack.enter_async_context(self.pool.session_lock(worker.session_id))
        return worker

    async def _continued(
        self,
        request: TurnRequest,
        split: conversation.Split,
        seed: str,
        access: Access,
        stack: AsyncExitStack,
    ) -> SessionRecord | None:
        """The session this request continues, its lock held on ``stack``; None: a new one.

        Another owner's session is never found: to them it does not exist (404)."""
        owner = access.owner
        key = request.conversation_key
        if request.session_id is not None:
            record = await self._lock(request.session_id, stack, lambda r: r.owner == owner)
            if record is None:
                raise errors.SessionNotFound(
                    f"No session {request.session_id!r} (unknown, expired or deleted).", param="session_id"
                )
            if key is not None and record.conversation_key != key:
                await self._bind(record.session_id, key, owner)
            return record
        if request.previous_turn_id is not None:
            return await self._after_turn(request.previous_turn_id, key, owner, stack)
        if key is not None:
            named = await self.store.by_key(key, owner)
            if named is not None:
                # Under the key's lock only a DELETE can change it meanwhile: then start anew.
                return await self._lock(named.session_id, stack,
                                        lambda r: r.conversation_key == key and r.owner == owner)
        if not split.history:
            return None
        base = conversation.extend(seed, split.history)
        found = await self.store.find_head(base)
        if found is None:
            return None
        # Another request on the same history may have moved it on meanwhile.
        record = await self._lock(found.session_id, stack,
                                  lambda r: r.head_digest == base and r.matchable and r.owner == owner)
        if record is not None and key is not None:
            await self._bind(record.session_id, key, owner)
        return record

    async def _after_turn(
        self, turn_id: str, key: str | None, owner: str, stack: AsyncExitStack
    ) -> SessionRecord:
        """The session whose latest completed turn is ``turn_id``, locked."""
        previous = await self.store.get_turn(turn_id, owner)
        record = None
        if previous is not None:
            record = await self._lock(previous.session_id, stack, lambda r: r.owner == owner)
        if previous is None or record is None:
            raise errors.ResponseNotFound("No stored response to continue from (unknown, not stored, deleted "
                                          "or expired).", param="previous_turn")
        if record.last_turn_id != turn_id:
            raise errors.Conflict(
                "That response is not the latest of its conversation: continue from the latest one, "
                "or resend the history.",
                param="previous_turn", code="response_not_latest",
            )
        if key is not None and record.conversation_key != key:
            await self._bind(record.session_id, key, owner)
        return record

    async def _lock(
        self, session_id: str, stack: AsyncExitStack, accept: Callable[[SessionRecord], bool]
    ) -> SessionRecord | None:
        """Take the session's lock and read it again; keep the lock only if it is ``accept``ed.

        Deciding after the lock is what makes a DELETE, or a concurrent turn that moved the
        session on, win over a request that found the session just before.
        """
        held = AsyncExitStack()
        await held.enter_async_context(self.pool.session_lock(session_id))
        try:
            record = await self.store.get(session_id)
        except BaseException:
            await held.aclose()
            raise
        if record is None or not accept(record):
            await held.aclose()
            return None
        stack.push_async_callback(held.aclose)
        return record

    async def _bind(self, session_id: str, key: str, owner: str) -> None:
        if not await self.store.bind_key(session_id, key, owner):
            raise errors.ConversationConflict(
                f"The conversation id {key!r} already names another session.", param="conversation_id"
            )

    # --- sessions ----------------------------------------------------------------------------

    async def fork(self, session_id: str, conversation_key: str | None = None, access: Access = PUBLIC) -> SessionRecord:
        """A new session with a copy of ``session_id``'s droid history (``droid.fork_session``).

        The source is untouched. The fork has the source's history digest but is not continued
        by a stateless resend until it has run a turn of its own: it is meant to be used by id.
        """
        async with AsyncExitStack() as stack:
            if conversation_key is not None:
                lock = f"{KEY_LOCK}{access.owner}\0{conversation_key}"
                await stack.enter_async_context(self.pool.session_lock(lock))
                if await self.store.by_key(conversation_key, access.owner) is not None:
                    raise errors.ConversationConflict(
                        f"The conversation id {conversation_key!r} already names another session.",
                        param="conversation_id",
                    )
            source = await self._lock(session_id, stack, lambda r: r.owner == access.owner)
            if source is None:
                raise errors.SessionNotFound(f"No session {session_id!r} (unknown, expired or deleted).")
            # No model in the settings: the lease loads the session and changes nothing in it.
            keep = SessionSettings(autonomy=self.base_settings.autonomy,
                                   disabled_tool_ids=self.base_settings.disabled_tool_ids)
            try:
                async with self.pool.lease(Want(keep, session_id=session_id)) as worker:
                    result = await worker.call("droid.fork_session", {})
            except errors.SessionNotFound:
                await self.store.delete(session_id)
                raise errors.SessionNotFound(f"droid no longer has session {session_id!r}; it is forgotten.") from None
            except DroidRequestError as exc:
                raise errors.UpstreamError(f"droid refused droid.fork_session: {exc.droid_message}") from None
            fork_id = result.get("newSessionId")
            if not isinstance(fork_id, str) or not fork_id:
                raise errors.UpstreamError("droid.fork_session returned no newSessionId")
            await self.store.create(
                fork_id, source.model, conversation_key=conversation_key, parent_id=session_id,
                head_digest=source.head_digest, diverged=source.diverged or source.in_flight,
                owner=access.owner,
            )
            record = await self.store.get(fork_id)
            assert record is not None
            log.info("session.forked", session=session_id, fork=fork_id)
            return record

    async def delete(self, session_id: str, access: Access = PUBLIC) -> bool:
        """Forget a session (after a running turn on it ends); no request reaches it again."""
        async with self.pool.session_lock(session_id):
            record = await self.store.get(session_id)
            if record is None or record.owner != access.owner:
                return False
            return await self.store.delete(session_id)

    def _settings(self, model_id: str, request: TurnRequest, system: str | None, access: Access) -> SessionSettings:
        base = self.base_settings
        return SessionSettings(
            model_id=model_id,
            system_prompt=system or None,
            reasoning_effort=request.reasoning_effort,
            autonomy=access.autonomy or base.autonomy,
            disabled_tool_ids=base.disabled_tool_ids if access.disabled_tool_ids is None else access.disabled_tool_ids,
        )
