"""A turn's bookkeeping: its record when droid completes it or it parks on client tools, and its
settlement when it ends any other way. Each turn owns a ``Recorder``; no caller has to remember
to record."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass

import anyio
import structlog

from droidpool.droid.protocol import Usage
from droidpool.store.base import SessionStore, TurnRow

from . import conversation
from .access import Access
from .ledger import Ledger
from .model import Message, Text, TurnRequest, TurnResult
from .nodes import Cluster
from .parking import Parking, Run
from .pricing import Cost
from .sessions import Sessions
from .turn import Turn, to_the_end

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Books:
    """Where every turn is recorded: the store and its ledger, droid's files (with several nodes),
    and the service's counters."""

    store: SessionStore
    ledger: Ledger
    sessions: Sessions
    parking: Parking
    cluster: Cluster | None
    counters: Counter[str]


class Recorder:
    """The bookkeeping of the droid turn ``request`` runs on ``session_id``: created before the
    turn reaches droid, so that a turn that fails on the way is settled too (``settle``)."""

    def __init__(self, books: Books, request: TurnRequest, access: Access, session_id: str, model_id: str) -> None:
        self.books = books
        self.request = request
        self.access = access
        self.session_id = session_id
        self.model_id = model_id
        self.run: Run | None = None  # the turn's driver, once the turn has started

    async def complete(self, turn: Turn) -> TurnResult:
        """droid completed the turn: the session's head moves (its history now ends with this
        answer) and the turn is in the ledger."""
        acc = turn.accumulator
        if acc.saw_tool_search:
            self.books.counters["tools_deferred"] += 1
            log.warning("turn.client_tools_deferred", session=turn.session_id,
                        detail="droid hid the client tools behind ToolSearch: an extra LLM round trip")
        cost = self.books.ledger.cost(turn.model_id or turn.request.model, acc.usage)
        result = TurnResult(turn.turn_id, turn.session_id, turn.request.model, acc.text, acc.reasoning,
                            acc.usage, turn.created, standard_tokens=cost.standard_tokens)
        await self._record(turn, result, Message.of("assistant", acc.text), cost)
        return result

    async def park(self, turn: Turn) -> TurnResult:
        """The LLM called client tools and droid waits for permission: the turn is recorded as far
        as the calls (the client resends them with the results) and stays open."""
        await self.books.parking.admit(turn)
        acc = turn.accumulator
        cost = self.books.ledger.cost(turn.model_id or turn.request.model, acc.usage)
        result = TurnResult(turn.turn_id, turn.session_id, turn.request.model, acc.text, acc.reasoning, acc.usage,
                            turn.created, stop="tool_calls", tool_calls=tuple(acc.tool_calls),
                            standard_tokens=cost.standard_tokens)
        answer = Message("assistant", (Text(acc.text), *acc.tool_calls))
        await self._record(turn, result, answer, cost, parks=True)
        self.books.counters["parked"] += 1
        log.info("turn.parked", session=turn.session_id, calls=[c.name for c in acc.tool_calls])
        return result

    async def _record(self, turn: Turn, result: TurnResult, answer: Message, cost: Cost, *,
                      parks: bool = False) -> None:
        """All of it, or none of it: a client that hangs up meanwhile does not cut it short (the turn
        then counts once, as recorded)."""
        books = self.books
        head = conversation.extend(turn.base, (*turn.sent, answer))
        kept = {"result": result.to_json(), "echo": dict(turn.request.echo)} if turn.request.keep_output else None
        row = books.ledger.priced_row(TurnRow(
            turn.turn_id, turn.session_id, turn.request.model, result.usage, turn.started_at, turn.access.owner,
            turn.request.dialect, kept, droid_model=turn.model_id, conversation_key=turn.request.conversation_key,
            attachments=turn.attached[0], attachment_bytes=turn.attached[1]), cost)

        async def write() -> None:
            with anyio.CancelScope(shield=True):
                await books.store.complete_turn(row, head)
                if books.cluster is not None:
                    await books.cluster.keep_files(turn.session_id)
            books.ledger.recorded(row)
            turn.head = head
            turn.ledger_row = row
            turn.parked = parks

        await to_the_end(write())

    async def settle(self) -> None:
        """The turn is over. One that reached droid and was not recorded failed: its usage is kept,
        and stateless resends stay off the session, whose droid history now holds the failed
        message. A parked turn that ended without its results (expired, yielded, refused, shut
        down) keeps the session as it is: its results, if they come, go to droid as a message.
        Either way, what droid reported about the turn after it ended is counted."""
        books, run = self.books, self.run
        turn = run.turn if run is not None else None
        if turn is not None and turn.ledger_row is not None and not turn.parked:
            return  # recorded (even if its request was cancelled just after)
        usage = turn.spent if turn is not None else Usage()
        asked = turn.request if turn is not None else self.request
        parked = turn is not None and turn.parked
        status = ("resume_refused" if run is not None and run.refused else "park_ended") if parked else "failed"
        # A parked turn's row was written when it parked (with no usage yet: droid reports it when
        # the droid turn ends): how it ended is a row of its own, with what droid then reported.
        row = books.ledger.priced_row(TurnRow(
            turn.turn_id if turn is not None and not parked else uuid.uuid4().hex, self.session_id, asked.model,
            usage, turn.started_at if turn is not None else time.time(), self.access.owner, asked.dialect,
            status=status, droid_model=self.model_id, conversation_key=asked.conversation_key,
            attachments=turn.attached[0] if turn is not None else 0,
            attachment_bytes=turn.attached[1] if turn is not None else 0), books.ledger.cost(self.model_id, usage))
        diverge = not parked
        with anyio.CancelScope(shield=True):
            if turn is not None and not parked and not turn.worker.alive:
                # Its droid died mid-turn: droid's file keeps the user message the client got no
                # answer to. Cut it, and the session stays as the client knows it.
                await books.sessions.forget_unanswered(self.session_id)
                diverge = False
            await books.store.fail_turn(row, diverge=diverge)
            if books.cluster is not None:
                await books.cluster.keep_files(self.session_id)
        books.ledger.recorded(row)
        log.info("turn.failed" if status == "failed" else "turn.park_ended", session=self.session_id)
