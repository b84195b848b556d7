"""One turn as a request sees it: its outputs under deadlines; it records, parks or settles itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import anyio

from droidpool import errors
from droidpool.droid.protocol import TextDelta, ThinkingDelta, TurnEvent, Usage
from droidpool.droid.turnstream import TurnStream
from droidpool.droid.worker import Worker
from droidpool.store.base import TurnRow

from .access import Access
from .model import Message, Output, TextOut, TurnRequest, TurnResult
from .output import Accumulator

T = TypeVar("T")


async def to_the_end(work: Awaitable[T]) -> T:
    """Run ``work`` to its end even if this task is cancelled meanwhile, then let the cancellation
    go on. aiohttp cancels a handler whose client hung up with ``Task.cancel()``, which anyio's
    shielded scopes do not stop: a turn's record must not be cut in half by it."""
    task = asyncio.ensure_future(work)
    interrupted = False
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            interrupted = True
    if interrupted:
        raise asyncio.CancelledError
    return task.result()


@dataclass
class Deadlines:
    first_token_s: float = 120.0
    turn_s: float = 900.0
    interrupt_grace_s: float = 3.0


class Bookkeeper(Protocol):
    """What records a turn (``core/recorder.Recorder``): once droid completes it, or once it parks
    on client tools."""

    async def complete(self, turn: Turn) -> TurnResult: ...
    async def park(self, turn: Turn) -> TurnResult: ...


@dataclass(kw_only=True)
class Turn:
    """A running turn. ``outputs()`` streams it under its deadlines. When droid completes it, it
    is recorded before the last output is handed over and ``result`` is set; when the LLM calls
    client tools it is recorded as far as the calls, ``result`` says ``tool_calls`` and the
    droid turn stays open (``parked``) for the request that brings the results. A turn that
    fails raises its error from ``outputs()``; one left unfinished is settled as failed (by its
    recorder, when its driver lets go of it)."""

    turn_id: str
    session_id: str
    model_id: str  # the droid model it runs on
    request: TurnRequest
    access: Access
    worker: Worker
    stream: TurnStream = field(repr=False)
    recorder: Bookkeeper = field(repr=False)
    deadlines: Deadlines = field(repr=False)
    base: str  # digest of the history before ``sent``
    sent: tuple[Message, ...]  # the request's messages this turn gives droid
    attached: tuple[int, int] = (0, 0)  # the images and documents it gave droid: how many, how many bytes
    accumulator: Accumulator = field(default_factory=Accumulator)
    started_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    result: TurnResult | None = None
    head: str | None = None  # the history digest once recorded
    parked: bool = False
    ledger_row: TurnRow | None = None  # its row in the usage ledger, once recorded
    client_gone: bool = False  # its client hung up before it had everything: a park is released at once

    @property
    def created(self) -> int:
        return int(self.started_at)

    @property
    def usage(self) -> Usage:
        return self.accumulator.usage

    @property
    def ttft_s(self) -> float | None:
        return self.first_token_at - self.started if self.first_token_at is not None else None

    async def outputs(self, tick_s: float) -> AsyncIterator[Output | None]:
        """What to send, as droid produces it; None after ``tick_s`` with nothing to send (keep-alive:
        droid is silent, or its text is held back, as a structured answer's is until droid accepts it)."""
        quiet_since = time.monotonic()
        async for event in self._events(tick_s):
            if event is None:
                quiet_since = time.monotonic()
                yield None
                continue
            outputs = self.accumulator.feed(event)
            for output in outputs:
                yield output
            if outputs:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= tick_s:
                quiet_since = time.monotonic()
                yield None
            if self.accumulator.permission is not None:
                self.result = await self.recorder.park(self)  # droid waits for the client's results
                return
        failure = self.accumulator.failure()
        if failure is not None:
            raise failure
        self.result = await self.recorder.complete(self)
        if self.accumulator.structured and self.result.text:
            yield TextOut(self.result.text)  # the answer droid accepted, recorded already

    async def _events(self, tick_s: float) -> AsyncIterator[TurnEvent | None]:
        while True:
            now = time.monotonic()
            deadline = self.started + self.deadlines.turn_s
            if self.first_token_at is None:
                deadline = min(deadline, self.started + self.deadlines.first_token_s)
            wait = min(tick_s, deadline - now)
            if wait <= 0:
                which = "first token" if self.first_token_at is None else "turn"
                limit = self.deadlines.first_token_s if self.first_token_at is None else self.deadlines.turn_s
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

    @property
    def spent(self) -> Usage:
        """What droid reports the turn used, including after an interrupt nobody read."""
        completed = self.stream.completed
        return completed.usage if completed is not None else self.accumulator.usage

    def resumed(self, turn_id: str, request: TurnRequest, access: Access, sent: tuple[Message, ...],
                attached: tuple[int, int]) -> Turn:
        """The same droid turn, carried on by another request (the one with the tool results)."""
        assert self.head is not None
        return Turn(turn_id=turn_id, session_id=self.session_id, model_id=self.model_id, request=request,
                    access=access, worker=self.worker, stream=self.stream, recorder=self.recorder,
                    deadlines=self.deadlines, base=self.head, sent=sent, attached=attached,
                    accumulator=Accumulator(client_name=self.accumulator.client_name,
                                            structured=self.accumulator.structured))
