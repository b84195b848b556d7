"""JSON-RPC requests in flight to one droid: each waits for the response with its id."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio

from .protocol import Response


class DroidRequestError(Exception):
    """droid answered a request with a JSON-RPC error."""

    def __init__(self, method: str, error: dict[str, Any]) -> None:
        self.method = method
        self.code = error.get("code")
        self.droid_message = str(error.get("message", ""))
        super().__init__(f"{method}: {self.droid_message} (code {self.code})")


class Reply:
    """What one request waits for: ``arrived`` is set with its ``response``, or without one if droid died."""

    def __init__(self) -> None:
        self.arrived = anyio.Event()
        self.response: Response | None = None


class PendingCalls:
    """The requests awaiting droid's responses, by id."""

    def __init__(self) -> None:
        self._waiting: dict[str, Reply] = {}

    @contextmanager
    def expect(self, request_id: str) -> Iterator[Reply]:
        """Wait for the response to ``request_id`` while inside."""
        reply = Reply()
        self._waiting[request_id] = reply
        try:
            yield reply
        finally:
            self._waiting.pop(request_id, None)

    def resolve(self, response: Response) -> None:
        """Hand a response to its request; one nobody waits for (any more) is dropped."""
        reply = self._waiting.get(str(response.id))
        if reply is not None and not reply.arrived.is_set():
            reply.response = response
            reply.arrived.set()

    def abandon_all(self) -> None:
        """droid is gone: every waiter wakes without a response."""
        for reply in self._waiting.values():
            reply.arrived.set()
