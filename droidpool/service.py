"""The daemon's life: start store → pool → HTTP site → readiness; stop them in reverse on a signal."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import anyio
import anyio.abc
import structlog
from aiohttp import web

from .chat import ChatService
from .config import ALL_TOOL_IDS, Config
from .http import build_app
from .policy import PoolPolicy
from .pool import Pool
from .store import SessionStore
from .worker import LaunchSpec, SessionSettings

log = structlog.get_logger(__name__)

DROID_ARGS = ("exec", "--input-format", "stream-jsonrpc", "--output-format", "stream-jsonrpc")


class StartupError(RuntimeError):
    """droidpool cannot start; the message says what to fix."""


def resolve_binary(binary: str) -> str:
    binary = os.path.expanduser(binary)
    found = shutil.which(binary) if os.sep not in binary else (binary if os.access(binary, os.X_OK) else None)
    if found is None:
        raise StartupError(
            f"droid executable {binary!r} not found or not executable; install it "
            "(npm install @factory/cli-linux-x64) and set droid.binary"
        )
    return str(Path(found).resolve())


def worker_env(config: Config, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The workers' environment: ours minus droidpool's own settings, plus droid's knobs."""
    env = {k: v for k, v in (os.environ if environ is None else environ).items() if not k.startswith("DROIDPOOL_")}
    env["FACTORY_LOG_FILE"] = config.droid.log_file
    if config.droid.home:
        env["HOME"] = str(Path(config.droid.home).expanduser())
    if config.droid.airgap:
        env["FACTORY_AIRGAP_ENABLED"] = "1"
    env.update(config.droid.env)
    return env


def launch_spec(config: Config) -> LaunchSpec:
    cwd = config.worker_cwd
    cwd.mkdir(parents=True, exist_ok=True)
    return LaunchSpec(
        argv=(resolve_binary(config.droid.binary), *DROID_ARGS),
        env=worker_env(config),
        cwd=str(cwd),
        machine_id=config.droid.machine_id,
        permission_policy=config.droid.permission_policy,
        max_line_bytes=config.pool.max_event_line_bytes,
        stop_grace_s=config.pool.stop_grace_s,
    )


def base_settings(config: Config) -> SessionSettings:
    enabled = set(config.droid.enabled_tools)
    return SessionSettings(
        model_id=None,
        autonomy=config.droid.autonomy,
        disabled_tool_ids=tuple(t for t in ALL_TOOL_IDS if t not in enabled),
    )


def build_pool(config: Config, spec: LaunchSpec | None = None) -> Pool:
    return Pool(
        spec or launch_spec(config),
        base_settings=base_settings(config),
        policy=PoolPolicy.from_config(config.pool),
    )


def build_chat(config: Config, pool: Pool, store: SessionStore) -> ChatService:
    return ChatService(
        pool,
        store,
        base_settings(config),
        first_token_s=config.deadlines.first_token_s,
        turn_s=config.deadlines.turn_s,
        interrupt_grace_s=config.deadlines.interrupt_grace_s,
        configured_models=[m.id for m in config.pool.models],
    )


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT (handled from the first instant, even while warming up)."""
    spec = launch_spec(config)  # a StartupError here reaches the CLI as a plain message
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_signals, signals, stop)
            await _run(config, spec, stop, tg)
            tg.cancel_scope.cancel()


async def _watch_signals(signals: AsyncIterator[int], stop: anyio.Event) -> None:
    async for signum in signals:
        log.info("droidpool.signal", signal=signal.Signals(signum).name)
        stop.set()


async def _announce_ready(pool: Pool, timeout: float) -> None:
    warm = await pool.wait_warm(timeout)
    log.info("droidpool.ready" if warm else "droidpool.not_warm", pool=repr(pool), cause=pool.last_spawn_error)


async def _sweep_sessions(store: SessionStore, every_s: float = 600.0) -> None:
    """Expired sessions leave the store; droid's own session files are left alone."""
    while True:
        swept = await store.sweep()
        if swept:
            log.info("store.swept", sessions=swept)
        await anyio.sleep(every_s)


async def _run(config: Config, spec: LaunchSpec, stop: anyio.Event, tg: anyio.abc.TaskGroup) -> None:
    """Start store → pool → HTTP site → readiness; wait for ``stop``; stop in reverse."""
    store = SessionStore(config.store_path, config.store.session_ttl_s)
    await store.open()
    try:
        async with build_pool(config, spec) as pool:
            app = build_app(
                build_chat(config, pool, store),
                pool,
                store,
                max_body_bytes=config.server.max_body_bytes,
                keepalive_s=config.server.keepalive_s,
            )
            runner = web.AppRunner(
                app,
                access_log=None,
                handle_signals=False,
                shutdown_timeout=config.deadlines.interrupt_grace_s + 5,
            )
            await runner.setup()
            try:
                site = web.TCPSite(runner, config.server.host, config.server.port)
                try:
                    await site.start()
                except OSError as exc:
                    raise StartupError(
                        f"cannot listen on {config.server.host}:{config.server.port}: {exc.strerror or exc}"
                    ) from None
                log.info("droidpool.listening", host=config.server.host, port=config.server.port)
                tg.start_soon(_announce_ready, pool, config.pool.spawn_timeout_s)
                tg.start_soon(_sweep_sessions, store)
                await stop.wait()
                log.info("droidpool.stopping", pool=repr(pool))
            finally:
                await runner.cleanup()
    finally:
        await store.close()
    log.info("droidpool.stopped")
