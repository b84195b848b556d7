"""Turns parked on client tools: which wait, for how long, which yields its worker, and how a
parked turn is resumed with the client's results or released.

When the LLM calls client tools, droid waits for permission with no timeout: the turn is *parked*
there, its request answers with the calls, and the turn's driver keeps the lease, the locks and
the open droid turn until the request that brings the results (permission granted, droid's MCP
calls answered with them), or until the park ends: it expires (``tools.park_timeout_s``), yields
its worker to a waiting request, or is released because its client never got the calls.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio
import anyio.abc
import structlog

from droidpool import errors
from droidpool.droid.protocol import PermissionAsked
from droidpool.store.base import SessionStore

from . import attachments, conversation
from .access import Access
from .model import Attachment, Message, Text, ToolResult, TurnRequest
from .tools import LLM_PREFIX, ToolBroker
from .turn import Turn

log = structlog.get_logger(__name__)


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


def results_for(permission: PermissionAsked, new: Sequence[Message]) -> dict[str, ToolResult]:
    """Each pending call's result, from the request's new messages. droid cannot take a message
    mid-turn, so the client's words and images beside the results go with the last result."""
    by_id = {p.call_id: p for m in new for p in m.parts if isinstance(p, ToolResult)}
    last = by_id[permission.tool_uses[-1].id]
    text = "\n\n".join(p.text for m in new for p in m.parts if isinstance(p, Text) and p.text.strip())
    added = tuple(p for m in new if m.role != "tool" for p in m.parts if isinstance(p, Attachment))
    if text or added:
        content = f"{last.content}\n\n[The user added: {text}]" if text else last.content
        by_id[last.call_id] = ToolResult(last.call_id, content, last.is_error, (*last.attachments, *added))
    return by_id


class Parking:
    """The turns parked on client tools, by session: their limits, expiry, yielding and resumption.
    The turn service's task group runs the expiry timers (``bind``)."""

    def __init__(self, limits: ToolLimits, broker: ToolBroker, store: SessionStore, counters: Counter[str]) -> None:
        self.limits = limits
        self.broker = broker
        self.store = store
        self.counters = counters
        self.parked: dict[str, Run] = {}  # session id → its parked turn
        self._tg: anyio.abc.TaskGroup | None = None

    def bind(self, tg: anyio.abc.TaskGroup | None) -> None:
        """Run expiry timers in ``tg``; None (shutting down): every parked turn is released."""
        self._tg = tg
        if tg is None:
            for run in list(self.parked.values()):
                run.release.set()
                if run.expiry is not None:
                    run.expiry.cancel()
            self.parked.clear()

    def __len__(self) -> int:
        return len(self.parked)

    async def admit(self, turn: Turn) -> None:
        """Room for one more parked turn of ``turn``'s key, or droid's calls are cancelled and the
        request gets a 429."""
        owner_parked = sum(1 for r in self.parked.values() if r.turn.access.owner == turn.access.owner)
        if len(self.parked) < self.limits.max_parked and owner_parked < self.limits.max_parked_per_key:
            return
        assert turn.accumulator.permission is not None
        await turn.worker.answer_permission(turn.accumulator.permission.request_id, "cancel")
        self.counters["park_refused"] += 1
        raise errors.Overloaded(
            f"Too many turns wait for client tool results ({len(self.parked)} in all, {owner_parked} of "
            "this key's); send the results of the pending ones first.", code="parked_limit", retry_after=5)

    def hold(self, run: Run) -> bool:
        """Keep ``run`` parked until its results come (False: shutting down, it is released)."""
        if self._tg is None or run.release.is_set():
            return False
        self.parked[run.turn.session_id] = run
        run.parked_at = time.monotonic()
        run.expiry = anyio.CancelScope()
        self._tg.start_soon(self._expire, run)
        return True

    async def _expire(self, run: Run) -> None:
        assert run.expiry is not None
        with run.expiry:
            await anyio.sleep(self.limits.park_timeout_s)
            if self.parked.get(run.turn.session_id) is run:
                del self.parked[run.turn.session_id]
                self.counters["park_expired"] += 1
                log.warning("turn.park_expired", session=run.turn.session_id, after_s=self.limits.park_timeout_s)
                run.release.set()

    def yield_oldest(self) -> bool:
        """A request waits for a worker and none is free: the turn parked longest gives its worker
        up (interrupted, recorded ``park_ended``); its results, if they come, continue the session
        as a message. True if one did."""
        if not self.parked or self._tg is None:
            return False
        run = min(self.parked.values(), key=lambda r: r.parked_at)
        del self.parked[run.turn.session_id]
        self.counters["park_yielded"] += 1
        log.info("turn.park_yielded", session=run.turn.session_id, parked_s=round(time.monotonic() - run.parked_at, 3))
        self._tg.start_soon(self.release, run)
        return True

    async def release(self, run: Run) -> None:
        """End ``run``'s park: its driver interrupts the droid turn and gives everything back."""
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
            await self.release(run)

    async def resume(self, session_id: str | None, request: TurnRequest, access: Access, model_id: str,
                     intake: attachments.Intake) -> Run | None:
        """The turn parked on ``session_id`` that ``request`` brings the results for, carried on;
        None if there is none (a request without results cancels that turn). Results that answer
        only some of the calls are a 400 and the turn stays parked; results whose content can never
        be taken are a 400 and the turn is released at once."""
        run = self.parked.get(session_id) if session_id is not None else None
        if run is None or run.turn.access.owner != access.owner:
            return None
        parked = run.turn
        new = conversation.split(request.messages).new
        got = {p.call_id for m in new for p in m.parts if isinstance(p, ToolResult)}
        if not got:  # the client moved on without the results: droid's calls are cancelled
            await self.release(run)
            return None
        wanted = {c.id for c in parked.accumulator.tool_calls}
        if wanted != got:
            raise errors.InvalidRequest(
                f"The tool results answer {sorted(got)}, but the pending calls are {sorted(wanted)}: "
                "send one result for each of them.", param="messages")
        model_id = parked.model_id or model_id
        try:
            checked = intake.checked(new, request.model, model_id)
            new = intake.for_droid(new, checked, model_id)
        except errors.InvalidRequest as exc:
            run.refused = True  # no retry of these results can succeed: the worker goes back now
            self.counters["resume_refused"] += 1
            log.info("turn.resume_refused", session=parked.session_id, why=exc.message)
            await self.release(run)
            raise
        permission = parked.accumulator.permission
        assert permission is not None
        by_id = results_for(permission, new)
        del self.parked[parked.session_id]
        if run.expiry is not None:
            run.expiry.cancel()
        self.broker.supply(parked.session_id, [(use.name.removeprefix(LLM_PREFIX), use.input, by_id[use.id])
                                               for use in permission.tool_uses])
        try:
            await self.store.begin_turn(parked.session_id)
            run.turn = parked.resumed(uuid.uuid4().hex, request, access, tuple(new),
                                      (len(checked), sum(len(a.data) for a in checked)))
            self.counters["resumed"] += 1
            log.info("turn.resumed", session=parked.session_id, results=len(got))
            await parked.worker.answer_permission(permission.request_id, "proceed_once")
        except BaseException:
            run.release.set()  # its request went away (or droid did) before the turn went on: release it
            raise
        return run
