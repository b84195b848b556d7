"""A chat request's path: find or create its droid session, lease a worker, run the turn, record it."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from droidpool import errors
from droidpool.api.openai_chat import ChatRequest
from droidpool.droid.protocol import TextDelta, ThinkingDelta, TurnCompleted, TurnEvent, Usage
from droidpool.droid.worker import DroidRequestError, SessionSettings, TurnStream, Worker
from droidpool.pool.pool import Pool, Want
from droidpool.store.sqlite import SessionRecord, SessionStore

from . import conversation
from .conversation import ChatMessage

log = structlog.get_logger(__name__)

KEY_LOCK = "conversation-id:"  # pool.session_lock namespace for conversation ids


@dataclass
class Outcome:
    """How a turn ended, as far as the store is concerned."""

    completed: TurnCompleted | None = None  # droid's end of turn, successful or not
    recorded: bool = False  # the new head was stored


@dataclass
class Turn:
    """A running turn as the HTTP layer sees it."""

    session_id: str
    worker: Worker
    new_session: bool
    stream: TurnStream
    first_token_s: float
    total_s: float
    base: str  # digest of the history before ``sent``
    sent: tuple[ChatMessage, ...]  # the request's messages this turn gives droid
    outcome: Outcome = field(default_factory=Outcome)
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    async def events(self, tick_s: float) -> AsyncIterator[TurnEvent | None]:
        """The turn's events under its deadlines; None after ``tick_s`` of silence (keep-alive)."""
        while True:
            now = time.monotonic()
            deadline = self.started + self.total_s
            if self.first_token_at is None:
                deadline = min(deadline, self.started + self.first_token_s)
            wait = min(tick_s, deadline - now)
            if wait <= 0:
                which = "first token" if self.first_token_at is None else "turn"
                limit = self.first_token_s if self.first_token_at is None else self.total_s
                raise errors.DeadlineExceeded(f"droid exceeded the {which} deadline of {limit:g} s")
            event: TurnEvent | None = None
            with anyio.move_on_after(wait):
                try:
                    event = await self.stream.__anext__()
                except StopAsyncIteration:
                    return
            if event is None:
                if time.monotonic() >= deadline:
                    continue
                yield None
                continue
            if self.first_token_at is None and isinstance(event, TextDelta | ThinkingDelta):
                self.first_token_at = time.monotonic()
            if isinstance(event, TurnCompleted):
                self.outcome.completed = event
            yield event


@dataclass(frozen=True)
class Access:
    """Who is asking (only their own sessions are visible to them) and what droid settings
    their new sessions get; the defaults are the unauthenticated operator's."""

    owner: str = ""
    autonomy: str | None = None  # None: droid.autonomy from the config
    disabled_tool_ids: tuple[str, ...] | None = None  # None: from droid.enabled_tools


PUBLIC = Access()


class ChatService:
    def __init__(
        self,
        pool: Pool,
        store: SessionStore,
        base_settings: SessionSettings,
        *,
        first_token_s: float,
        turn_s: float,
        interrupt_grace_s: float,
        configured_models: Sequence[str] = (),
        model_names: Mapping[str, str] | None = None,
    ) -> None:
        self.pool = pool
        self.store = store
        self.base_settings = base_settings
        self.first_token_s = first_token_s
        self.turn_s = turn_s
        self.interrupt_grace_s = interrupt_grace_s
        self.configured_models = tuple(configured_models)
        self.model_names = dict(model_names or {})  # BYOK names → display names

    # --- models ------------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        seen: dict[str, dict[str, Any]] = {}
        for model in self.pool.available_models:
            if isinstance(model, dict) and isinstance(model.get("id"), str) and not model.get("disabled"):
                seen[model["id"]] = model
        for model_id in self.configured_models:
            seen.setdefault(model_id, {"id": model_id})
        return list(seen.values())

    def resolve_model(self, request: ChatRequest) -> str:
        """droid's id for the requested model, or ModelNotFound.

        droid lists generated ids (``custom:<displayName>-<n>``); a name without the ``-<n>``
        suffix, any id configured in pool.models, and a BYOK model's name from droid's
        settings (``custom:<model>``) are accepted too.
        """
        models = {m["id"]: m for m in self.models()}
        if not models:
            return request.model  # nothing known yet (no worker has answered): droid will judge
        aliases = {re.sub(r"-\d+$", "", model_id): model_id for model_id in models}
        by_display = {m.get("displayName"): m["id"] for m in models.values() if m.get("isCustom")}
        for name, display in self.model_names.items():
            if display in by_display:
                aliases.setdefault(name, by_display[display])
        model_id = request.model if request.model in models else aliases.get(request.model)
        if model_id is None:
            raise errors.ModelNotFound(
                f"The model {request.model!r} does not exist or droid cannot use it; "
                f"available: {', '.join(sorted(models))}.",
                param="model",
            )
        supported = models[model_id].get("supportedReasoningEfforts")
        if request.reasoning_effort and isinstance(supported, list) and request.reasoning_effort not in supported:
            raise errors.InvalidRequest(
                f"{request.model} supports reasoning_effort {', '.join(map(str, supported))}; "
                f"got {request.reasoning_effort!r}.",
                param="reasoning_effort",
            )
        return model_id

    # --- a turn ------------------------------------------------------------------------------

    @asynccontextmanager
    async def turn(
        self, request: ChatRequest, conversation_key: str | None = None, access: Access = PUBLIC
    ) -> AsyncIterator[Turn]:
        """Find the session, lease a worker, start the turn; the block consumes its events.

        The session is the one named by ``request.session_id``, else the one named by
        ``conversation_key`` (created on first use), else the one whose history the request
        resends, else a new one. Leaving the block before the turn completes interrupts it;
        a completed turn is recorded (``record``) so the next request continues it, and a turn
        that reached droid but was not recorded counts as failed (``store.fail_turn``).
        """
        model_id = self.resolve_model(request)
        split = conversation.split(request.messages)
        # Each owner's stateless histories live in their own digest space.
        seed = conversation.seed(split.system, namespace=access.owner)
        async with AsyncExitStack() as stack:
            if conversation_key is not None:
                # Held for the whole turn: a conversation id's first uses never race.
                lock = f"{KEY_LOCK}{access.owner}\0{conversation_key}"
                await stack.enter_async_context(self.pool.session_lock(lock))
            record = await self._continued(request, split, seed, conversation_key, access, stack)
            worker = None
            if record is not None:
                worker = await self._lease_continued(record, model_id, request, access, stack)
            if record is not None and worker is not None:
                session_id = record.session_id
                base = record.head_digest or seed
                sent: tuple[ChatMessage, ...] = split.new
                prompt = conversation.turn_text(split.new)
                await self.store.begin_turn(session_id)
            else:
                record = None
                worker = await self._lease_new(model_id, request, split.system, conversation_key, access, stack)
                assert worker.session_id is not None
                session_id = worker.session_id
                base = seed
                sent = (*split.history, *split.new)
                prompt = conversation.transcript_prompt(split.history, split.new)
            outcome = Outcome()
            stack.push_async_callback(self._settle, session_id, outcome)
            log.debug("chat.turn", session=session_id, worker=worker.id, new=record is None, prompt=prompt)
            stream = await stack.enter_async_context(worker.turn(prompt, self.interrupt_grace_s))
            yield Turn(session_id, worker, record is None, stream, self.first_token_s, self.turn_s,
                       base, sent, outcome)

    async def _lease_continued(
        self, record: SessionRecord, model_id: str, request: ChatRequest, access: Access, stack: AsyncExitStack
    ) -> Worker | None:
        """A worker holding ``record``'s session; None if droid lost it and the client resent
        its whole history (so a new session loses nothing)."""
        want = Want(self._settings(model_id, request, None, access), session_id=record.session_id)
        try:
            return await stack.enter_async_context(self.pool.lease(want))
        except errors.SessionNotFound:
            # droid lost the session (its files were removed): forget it too.
            log.warning("chat.session_lost", session=record.session_id)
            await self.store.delete(record.session_id)
            if request.session_id is None and record.conversation_key is None:
                return None
            raise errors.SessionNotFound(
                f"droid no longer has session {record.session_id!r}; it is forgotten, "
                "and the next request starts a new one.",
                param="session_id" if request.session_id is not None else "conversation_id",
            ) from None

    async def _lease_new(
        self, model_id: str, request: ChatRequest, system: str, key: str | None, access: Access,
        stack: AsyncExitStack,
    ) -> Worker:
        """A worker with a new session, recorded (named ``key``) with a turn in flight."""
        settings = self._settings(model_id, request, system, access)
        worker = await stack.enter_async_context(self.pool.lease(Want(settings)))
        assert worker.session_id is not None
        if not await self.store.create(worker.session_id, request.model, conversation_key=key, in_flight=True,
                                       owner=access.owner):
            raise errors.ConversationConflict(  # only if another process took the id meanwhile
                f"The conversation id {key!r} names another session.", param="conversation_id"
            )
        await stack.enter_async_context(self.pool.session_lock(worker.session_id))
        return worker

    async def _continued(
        self,
        request: ChatRequest,
        split: conversation.Split,
        seed: str,
        key: str | None,
        access: Access,
        stack: AsyncExitStack,
    ) -> SessionRecord | None:
        """The session this request continues, its lock held on ``stack``; None: a new one.

        Another owner's session is never found: to them it does not exist (404)."""
        owner = access.owner
        if request.session_id is not None:
            record = await self._lock(request.session_id, stack, lambda r: r.owner == owner)
            if record is None:
                raise errors.SessionNotFound(
                    f"No session {request.session_id!r} (unknown, expired or deleted).", param="session_id"
                )
            if key is not None and record.conversation_key != key:
                await self._bind(record.session_id, key, owner)
            return record
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

    async def _settle(self, session_id: str, outcome: Outcome) -> None:
        """A turn that reached droid and was not recorded failed: keep its usage, and keep
        stateless resends off the session, whose droid history now holds the failed message."""
        if outcome.recorded:
            return
        usage = outcome.completed.usage if outcome.completed is not None else Usage()
        with anyio.CancelScope(shield=True):
            await self.store.fail_turn(session_id, usage)
        log.info("chat.turn_failed", session=session_id,
                 reason=outcome.completed.reason if outcome.completed else "incomplete")

    async def record(self, turn: Turn, request: ChatRequest, answer: str, usage: Usage) -> None:
        """Store the session's new head: its history now ends with this answer."""
        head = conversation.extend(turn.base, (*turn.sent, ChatMessage("assistant", answer)))
        await self.store.complete_turn(turn.session_id, request.model, head, usage)
        turn.outcome.recorded = True

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
            log.info("chat.session_forked", session=session_id, fork=fork_id)
            return record

    async def delete(self, session_id: str, access: Access = PUBLIC) -> bool:
        """Forget a session (after a running turn on it ends); no request reaches it again."""
        async with self.pool.session_lock(session_id):
            record = await self.store.get(session_id)
            if record is None or record.owner != access.owner:
                return False
            return await self.store.delete(session_id)

    def _settings(self, model_id: str, request: ChatRequest, system: str | None, access: Access) -> SessionSettings:
        base = self.base_settings
        return SessionSettings(
            model_id=model_id,
            system_prompt=system or None,
            reasoning_effort=request.reasoning_effort,
            autonomy=access.autonomy or base.autonomy,
            disabled_tool_ids=base.disabled_tool_ids if access.disabled_tool_ids is None else access.disabled_tool_ids,
        )
