"""A chat request's path: find or create its droid session, lease a worker, run the turn, record it."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from . import conversation, errors
from .conversation import ChatMessage
from .openai import ChatRequest
from .pool import Pool, Want
from .protocol import TextDelta, ThinkingDelta, TurnEvent, Usage
from .store import SessionStore
from .worker import SessionSettings, TurnStream, Worker

log = structlog.get_logger(__name__)


@dataclass
class Turn:
    """A running turn as the HTTP layer sees it."""

    session_id: str
    worker: Worker
    new_session: bool
    stream: TurnStream
    first_token_s: float
    total_s: float
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
            yield event


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
    ) -> None:
        self.pool = pool
        self.store = store
        self.base_settings = base_settings
        self.first_token_s = first_token_s
        self.turn_s = turn_s
        self.interrupt_grace_s = interrupt_grace_s
        self.configured_models = tuple(configured_models)

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
        suffix and any id configured in pool.models are accepted too.
        """
        models = {m["id"]: m for m in self.models()}
        if not models:
            return request.model  # nothing known yet (no worker has answered): droid will judge
        aliases = {re.sub(r"-\d+$", "", model_id): model_id for model_id in models}
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
    async def turn(self, request: ChatRequest) -> AsyncIterator[Turn]:
        """Find the session, lease a worker, start the turn; the block consumes its events.

        Leaving the block before the turn completes interrupts it; a completed turn is
        recorded so the next request (stateless resend or by session id) continues it.
        """
        model_id = self.resolve_model(request)
        split = conversation.split(request.messages)
        seed = conversation.seed(split.system)
        record = None
        if request.session_id is not None:
            record = await self.store.get(request.session_id)
            if record is None:
                raise errors.SessionNotFound(
                    f"No session {request.session_id!r} (unknown or expired).", param="session_id"
                )
            base = record.head_digest or seed
        elif split.history:
            base = conversation.extend(seed, split.history)
            record = await self.store.find_head(base)
        else:
            base = seed
        async with AsyncExitStack() as stack:
            if record is not None:
                await stack.enter_async_context(self.pool.session_lock(record.session_id))
                if request.session_id is None:
                    # Another request on the same history may have moved it on meanwhile.
                    current = await self.store.get(record.session_id)
                    if current is None or current.head_digest != base:
                        record = None
            settings = self._settings(model_id, request, split.system if record is None else None)
            if record is not None:
                prompt = conversation.turn_text(split.new)
                want = Want(settings, session_id=record.session_id)
            else:
                prompt = conversation.transcript_prompt(split.history, split.new)
                base = conversation.extend(seed, split.history)
                want = Want(settings)
            worker = await stack.enter_async_context(self.pool.lease(want))
            session_id = worker.session_id
            assert session_id is not None
            if record is None:
                await self.store.create(session_id, request.model)
                await stack.enter_async_context(self.pool.session_lock(session_id))
            log.debug("chat.turn", session=session_id, worker=worker.id, new=record is None, prompt=prompt)
            stream = await stack.enter_async_context(worker.turn(prompt, self.interrupt_grace_s))
            turn = Turn(session_id, worker, record is None, stream, self.first_token_s, self.turn_s)
            yield turn

    async def record(self, turn: Turn, request: ChatRequest, answer: str, usage: Usage) -> None:
        """Store the session's new head: its history now ends with this answer."""
        split = conversation.split(request.messages)
        if request.session_id is not None:
            existing = await self.store.get(turn.session_id)
            base = (existing.head_digest if existing else None) or conversation.seed(split.system)
            messages: Sequence[ChatMessage] = split.new
        else:
            base = conversation.seed(split.system)
            messages = (*split.history, *split.new)
        head = conversation.extend(base, (*messages, ChatMessage("assistant", answer)))
        await self.store.complete_turn(turn.session_id, request.model, head, usage)

    def _settings(self, model_id: str, request: ChatRequest, system: str | None) -> SessionSettings:
        base = self.base_settings
        return SessionSettings(
            model_id=model_id,
            system_prompt=system or None,
            reasoning_effort=request.reasoning_effort,
            autonomy=base.autonomy,
            disabled_tool_ids=base.disabled_tool_ids,
        )
