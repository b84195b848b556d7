"""One running turn's events, from the worker's stdout reader to the request that consumes them."""

from __future__ import annotations

from collections.abc import Callable

import anyio

from droidpool import errors

from .protocol import PermissionAsked, TurnCompleted, TurnEvent

TURN_EVENT_BUFFER = 256

ParkPolicy = Callable[[PermissionAsked], bool]  # True: the turn answers this permission request itself


class TurnChannel:
    """The worker's side of a running turn: where the reader sends its events, and whether it is over."""

    def __init__(self, park: ParkPolicy | None) -> None:
        self.send, self.receive = anyio.create_memory_object_stream[TurnEvent](
            TURN_EVENT_BUFFER
        )
        self.done = anyio.Event()
        self.abandoned = False
        self.park = park
        self.completed: TurnCompleted | None = None  # droid's end of the turn, read or not


class TurnStream:
    """The events of one running turn, ending with TurnCompleted; a crash raises WorkerCrashed."""

    def __init__(self, turn: TurnChannel, death_message: Callable[[], str]) -> None:
        self._turn = turn
        self._death_message = death_message  # why the worker is gone, asked only once it is
        self._completed = False

    def __aiter__(self) -> TurnStream:
        return self

    @property
    def completed(self) -> TurnCompleted | None:
        """How droid ended the turn, even when nobody read that far (an interrupted turn's usage)."""
        return self._turn.completed

    async def __anext__(self) -> TurnEvent:
        if self._completed:
            raise StopAsyncIteration
        try:
            event = await self._turn.receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise errors.WorkerCrashed(self._death_message()) from None
        if isinstance(event, TurnCompleted):
            self._completed = True
        return event
