"""The HTTP app over a real pool of fake droid workers, for tests through aiohttp's test server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from droidpool.api.server import make_runner
from droidpool.config import load
from droidpool.core.access import Authenticator
from droidpool.daemon.service import configured_app, open_configured_pool, running_turns
from droidpool.droid.protocol import Usage
from droidpool.droid.worker import LaunchSpec, Worker
from droidpool.pool.pool import Pool
from droidpool.store import SqliteStore, TurnRow
from tests.conftest import FAKE_DROID

MODEL = "custom:fake-model"


class DaemonTestServer(TestServer):
    """aiohttp's test server over the daemon's own runner (same handler cancellation, same
    handling of malformed requests)."""

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        kwargs.pop("handler_cancellation", None)
        return make_runner(self.app, **kwargs)


def turn_row(session_id: str, model: str, usage: Usage, **extra: Any) -> TurnRow:
    """A turn of ``session_id`` for the store's write methods, with a fresh id."""
    import time
    import uuid

    return TurnRow(uuid.uuid4().hex, session_id, model, usage, time.time(), **extra)


@asynccontextmanager
async def served(
    tmp_path: Path,
    *,
    worker_factory: Callable[[LaunchSpec, str | None], Worker] | None = None,
    auth: Authenticator | None = None,
    **overrides: Any,
) -> AsyncIterator[tuple[TestClient, Pool]]:
    """A daemon's app (pool warm, store open) served on loopback; ``overrides`` are config keys."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    settings: dict[str, Any] = {
        "droid.binary": str(FAKE_DROID),
        "droid.home": str(home),
        "server.state_dir": str(tmp_path / "state"),
        "server.keepalive_s": 5.0,
        "pool.models": [{"id": MODEL}],
        "pool.max_workers": 3,
        "pool.stop_grace_s": 1.0,
        "deadlines.interrupt_grace_s": 1.0,
        **overrides,
    }
    config = load(None, environ={}, overrides=settings)
    store = SqliteStore(config.store_path, config.store.session_ttl_s)
    await store.open()
    try:
        async with open_configured_pool(config, worker_factory=worker_factory or Worker) as pool:
            assert await pool.wait_warm(15)
            async with running_turns(config, pool, store) as turns:
                app = configured_app(config, turns, auth or Authenticator([]))
                async with TestClient(DaemonTestServer(app)) as client:
                    yield client, pool
    finally:
        await store.close()
