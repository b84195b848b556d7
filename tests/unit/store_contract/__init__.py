"""The store contract (``store/base.py``), one module per concern, each test run against every
backend: SQLite, and PostgreSQL on a real server the tests start (tests/pgserver.py). What the
modules share: the stores' clock, the opener the ``backend`` fixture (conftest.py) gives, a turn."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from droidpool.droid.protocol import Usage
from droidpool.store import SessionStore, TurnRow

TTL = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


Opener = Callable[[], Awaitable[SessionStore]]


USAGE = Usage(3, 2)  # a turn's, unless told


def turn(session_id: str, usage: Usage = USAGE, **extra: Any) -> TurnRow:
    return TurnRow(uuid.uuid4().hex, session_id, "custom:m", usage, 1.0, **extra)
