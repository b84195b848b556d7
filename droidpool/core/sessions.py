"""Which droid session a request continues, under that session's lock; forks and deletions."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import structlog

from droidpool import errors
from droidpool.droid.rpc import DroidRequestError
from droidpool.droid.sessions import carry_attachments, drop_unanswered
from droidpool.droid.spec import SessionSettings
from droidpool.droid.worker import Worker
from droidpool.pool.pool import Pool, Want
from droidpool.store.base import (
    MAX_LIST_LIMIT as MAX_LIST_LIMIT,  # re-exported: the api takes it from here
)
from droidpool.store.base import SessionRecord, SessionStore, UnknownCursor

from . import conversation
from .access import PUBLIC, Access
from .model import TurnRequest
from .tools import LLM_PREFIX

log = structlog.get_logger(__name__)

KEY_LOCK = "conversation-id:"  # pool.session_lock namespace for conversation ids


def key_lock(owner: str, key: str) -> str:
    return f"{KEY_LOCK}{owner}\0{key}"


class Sessions:
    """Finds, locks, creates, forks and forgets droid sessions for their owners."""

    def __init__(self, pool: Pool, store: SessionStore, base_settings: SessionSettings) -> None:
        self.pool = pool
        self.store = store
        self.base_settings = base_settings

    async def candidate(self, request: TurnRequest, seed: str, access: Access) -> str | None:
        """The session ``request`` names or resends, looked up without any lock (for finding a
        turn parked on it, whose driver holds that lock)."""
        if request.session_id is not None:
            return request.session_id
        record = await self.peek(request, seed, access)
        return record.session_id if record is not None else None

    async def peek(self, request: TurnRequest, seed: str, access: Access) -> SessionRecord | None:
        """The session record ``request`` names or resends, read without any lock (to route the
        request to the node holding it; the decision is checked again under the lock)."""
        if request.session_id is not None:
            return await self.store.get(request.session_id)
        if request.previous_turn_id is not None:
            previous = await self.store.get_turn(request.previous_turn_id, access.owner)
            return await self.store.get(previous.session_id) if previous is not None else None
        if request.conversation_key is not None:
            named = await self.store.by_key(request.conversation_key, access.owner)
            if named is not None:
                return named
        history = conversation.split(request.messages).history
        if not history:
            return None
        found = await self.store.find_head(conversation.extend(seed, history))
        return found if found is not None and found.owner == access.owner else None

    async def continued(
        self, request: TurnRequest, split: conversation.Split, seed: str, access: Access, stack: AsyncExitStack
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

    async def lease_continued(
        self, record: SessionRecord, want: Want, request: TurnRequest, stack: AsyncExitStack
    ) -> Worker | None:
        """A worker holding ``record``'s session; None if droid lost it and the client resent
        its whole history (so a new session loses nothing)."""
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

    @asynccontextmanager
    async def lock(self, name: str) -> AsyncIterator[None]:
        """Serialize everything done to one session (or conversation id): in this process, then
        across the nodes sharing the store."""
        async with self.pool.session_lock(name), self.store.hold(name):
            yield

    async def lease_new(self, want: Want, request: TurnRequest, access: Access, stack: AsyncExitStack) -> Worker:
        """A worker with a new session, recorded (named by the conversation key) with a turn in flight."""
        worker = await stack.enter_async_context(self.pool.lease(want))
        assert worker.session_id is not None
        key = request.conversation_key
        if not await self.store.create(worker.session_id, request.model, conversation_key=key, in_flight=True,
                                       owner=access.owner):
            raise errors.ConversationConflict(  # only if another process took the id meanwhile
                f"The conversation id {key!r} names another session.", param="conversation_id"
            )
        await stack.enter_async_context(self.lock(worker.session_id))
        return worker

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
        await held.enter_async_context(self.lock(session_id))
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

    async def fork(self, session_id: str, conversation_key: str | None = None, access: Access = PUBLIC, *,
                   prepare: Callable[[SessionRecord], Awaitable[None]] | None = None,
                   forked: Callable[[str], Awaitable[None]] | None = None) -> SessionRecord:
        """A new session with a copy of ``session_id``'s droid history (``droid.fork_session``).

        The source is untouched. The fork has the source's history digest but is not continued
        by a stateless resend until it has run a turn of its own: it is meant to be used by id.
        With several nodes, ``prepare`` brings the source here (under its lock) and ``forked``
        makes this node the fork's holder, its files stored.
        """
        async with AsyncExitStack() as stack:
            if conversation_key is not None:
                await stack.enter_async_context(self.lock(key_lock(access.owner, conversation_key)))
                if await self.store.by_key(conversation_key, access.owner) is not None:
                    raise errors.ConversationConflict(
                        f"The conversation id {conversation_key!r} already names another session.",
                        param="conversation_id",
                    )
            source = await self._lock(session_id, stack, lambda r: r.owner == access.owner)
            if source is None:
                raise errors.SessionNotFound(f"No session {session_id!r} (unknown, expired or deleted).")
            if prepare is not None:
                await prepare(source)
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
            if self.pool.spec.sessions_dir:
                await anyio.to_thread.run_sync(carry_attachments, Path(self.pool.spec.sessions_dir), session_id,
                                               fork_id)
            if forked is not None:
                await forked(fork_id)
            record = await self.store.get(fork_id)
            assert record is not None
            log.info("session.forked", session=session_id, fork=fork_id)
            return record

    # --- what the session routes read -----------------------------------------------------------

    @property
    def ttl_s(self) -> float:
        return self.store.ttl_s

    async def owned(self, session_id: str, owner: str) -> SessionRecord | None:
        """``owner``'s session ``session_id`` (another owner's does not exist to them)."""
        record = await self.store.get(session_id)
        return record if record is not None and record.owner == owner else None

    async def listing(self, owner: str, limit: int, after: str | None = None,
                      key: str | None = None) -> tuple[list[SessionRecord], bool]:
        """``owner``'s sessions, newest first, ``limit`` after the one named ``after`` (or the one
        named by conversation id ``key``); and whether more follow."""
        if key is not None:
            record = await self.store.by_key(key, owner)
            return ([record] if record else []), False
        try:
            page = await self.store.page(limit, after, owner=owner)
        except UnknownCursor:
            raise errors.InvalidRequest(f"'after' names no session: {after!r}.", param="after") from None
        return page.records, page.has_more

    async def kept_output(self, turn_id: str, owner: str) -> Mapping[str, Any] | None:
        """What a turn kept of its answer (``keep_output``), if it is still stored."""
        turn = await self.store.get_turn(turn_id, owner)
        return turn.output if turn is not None else None

    async def forget_output(self, turn_id: str, owner: str) -> bool:
        return await self.store.forget_output(turn_id, owner)

    # --- crash consistency -------------------------------------------------------------------

    async def recover_interrupted(self, node_id: str | None = None) -> int:
        """Before serving: each session whose turn droidpool died in loses droid's record of that
        turn's user message (its client never got the answer, so the model must not see the
        question either), and matches stateless resends again. How many were recovered."""
        recovered = 0
        for session_id in await self.store.interrupted(node_id):
            async with self.lock(session_id):
                removed = await self.forget_unanswered(session_id)
                await self.store.recovered(session_id)
            log.info("session.recovered", session=session_id, bytes_removed=removed)
            recovered += 1
        return recovered

    async def forget_unanswered(self, session_id: str) -> int:
        """Cut droid's file of ``session_id`` back to its last answered turn (bytes removed)."""
        if not self.pool.spec.sessions_dir:
            return 0
        sessions_dir = Path(self.pool.spec.sessions_dir)
        return await anyio.to_thread.run_sync(drop_unanswered, sessions_dir, session_id, LLM_PREFIX)

    async def delete(self, session_id: str, access: Access = PUBLIC) -> bool:
        """Forget a session (after a running turn on it ends); no request reaches it again."""
        async with self.lock(session_id):
            record = await self.store.get(session_id)
            if record is None or record.owner != access.owner:
                return False
            return await self.store.delete(session_id)
