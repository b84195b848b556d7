"""How new conversations start (``mode``: minted or fresh), and what the self-test found."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import structlog

from droidpool.droid import minted
from droidpool.droid.minted import MintFailed
from droidpool.droid.spec import SessionSettings
from droidpool.droid.worker import Worker

from .fleet import Setup
from .policy import SessionMode

log = structlog.get_logger(__name__)


class SessionModes:
    """New conversations start in minted sessions once a self-test on a fresh worker has shown
    that droid loads them as written (``mode`` ``minted``); until then, if the test fails, or if
    minting is off, each needs a fresh spare (``mode`` ``fresh``). ``on_broken`` is called when
    minting is found broken: the spares that are no longer fresh must go."""

    def __init__(self, setup: Setup, mint: bool, counters: collections.Counter[str],
                 on_broken: Callable[[], None]) -> None:
        self._setup = setup
        self.mint = mint and bool(setup.spec.sessions_dir)
        self.mode: SessionMode = "fresh"
        self.self_test = "pending" if self.mint else "off (pool.mint_sessions = false)"
        self._counters = counters
        self._on_broken = on_broken

    @property
    def pending(self) -> bool:
        """The self-test has yet to run (on the next worker started)."""
        return self.self_test == "pending"

    def retest(self) -> None:
        """droid changed: back to fresh processes until the self-test has run again."""
        if self.mint:
            self.mode, self.self_test = "fresh", "pending"

    async def test(self, worker: Worker) -> bool:
        """Run the self-test on ``worker`` (fresh: it has held no conversation; afterwards it
        has loaded a session). True if droid loads minted sessions as written."""
        setup = self._setup
        timeout = setup.policy.spawn_timeout_s
        problems = await minted.self_test(worker, setup.spec, setup.base_settings, timeout)
        if problems:
            self.broken("; ".join(problems))
            return False
        self.mode, self.self_test = "minted", "ok"
        log.info("pool.session_self_test", result="ok", mode=self.mode)
        return True

    async def start(self, worker: Worker, settings: SessionSettings,
                    mcp_servers: list[dict[str, Any]] | None) -> None:
        """A new conversation in ``worker``, in a minted session. ``MintFailed`` if droid did not
        load it as written: the mode is then ``fresh``."""
        setup = self._setup
        try:
            await minted.start(worker, setup.spec, settings, setup.policy.spawn_timeout_s, mcp_servers)
        except MintFailed as exc:
            self.broken(str(exc))
            raise
        self._counters["sessions_minted"] += 1

    def broken(self, why: str) -> None:
        """droid does not load minted sessions as written: fall back to a fresh process per new
        conversation."""
        self._counters["session_self_test_failures"] += 1
        self.mode, self.self_test = "fresh", f"failed: {why}"
        log.error("pool.session_self_test", result="failed", reason=why, mode=self.mode,
                  consequence="each new conversation now needs a new droid process (~0.6 s)")
        self._on_broken()
