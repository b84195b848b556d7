"""The daemon's life: start store → pool → HTTP site → readiness; stop them in reverse on a signal."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import structlog
from aiohttp import web

from droidpool.api.app import build_app
from droidpool.api.browser import BrowserPolicy
from droidpool.api.mcp import build_mcp_app
from droidpool.api.metrics import Metrics
from droidpool.api.server import make_runner
from droidpool.config import Config, ConfigError, node_secret, store_url
from droidpool.core import failures
from droidpool.core.access import Authenticator, load_keys
from droidpool.core.attachments import Limits
from droidpool.core.catalog import Catalog
from droidpool.core.ledger import Ledger
from droidpool.core.nodes import Cluster
from droidpool.core.parking import ToolLimits
from droidpool.core.pricing import Pricing
from droidpool.core.service import TurnService
from droidpool.core.tools import ToolBroker, offered_directly
from droidpool.core.turn import Deadlines
from droidpool.droid import images
from droidpool.droid.launch import (
    StartupError,
    base_settings,
    byok_names,
    deferral_exemptions,
    launch_spec,
    turn_end_reasons,
)
from droidpool.droid.sessions import apply_prune, droid_sessions_dir, plan_prune
from droidpool.droid.spec import LaunchSpec
from droidpool.droid.worker import Worker
from droidpool.pool import procfs
from droidpool.pool.fleet import WorkerFactory
from droidpool.pool.policy import PoolPolicy, auto_max_workers
from droidpool.pool.pool import Pool, open_pool
from droidpool.store import SessionStore, open_store

from . import logs
from .systemd import Notifier

log = structlog.get_logger(__name__)


def pool_policy(config: Config) -> PoolPolicy:
    """The pool's limits; ``pool.max_workers = 0`` is sized from the memory available now."""
    cap = config.pool.max_workers or auto_max_workers(procfs.mem_available())
    return PoolPolicy.from_config(config.pool, max_workers=max(cap, config.pool.idle_min))


def open_configured_pool(config: Config, spec: LaunchSpec | None = None,
                         worker_factory: WorkerFactory = Worker) -> AbstractAsyncContextManager[Pool]:
    """The pool ``config`` describes, run for the ``async with`` block (see ``open_pool``)."""
    return open_pool(
        spec or launch_spec(config),
        base_settings=base_settings(config),
        policy=pool_policy(config),
        worker_factory=worker_factory,
        mint=config.pool.mint_sessions,
    )


def deadlines(config: Config) -> Deadlines:
    d = config.deadlines
    return Deadlines(first_token_s=d.first_token_s, turn_s=d.turn_s, interrupt_grace_s=d.interrupt_grace_s)


def tool_limits(config: Config) -> ToolLimits:
    t = config.tools
    return ToolLimits(park_timeout_s=t.park_timeout_s, max_parked=t.max_parked, max_parked_per_key=t.max_parked_per_key)


def build_cluster(config: Config, pool: Pool, store: SessionStore) -> Cluster | None:
    """This node among those sharing the store, if ``nodes.url`` is set."""
    n = config.nodes
    if not n.url:
        return None
    node_id = n.id or f"{socket.gethostname()}:{config.server.port}"
    return Cluster(store, node_id, n.url.rstrip("/"), node_secret(config, os.environ), Path(pool.spec.sessions_dir),
                   capacity=pool.max_workers, heartbeat_s=n.heartbeat_s, dead_after_s=n.dead_after_s)


def build_turns(config: Config, pool: Pool, store: SessionStore, broker: ToolBroker | None = None,
                cluster: Cluster | None = None) -> TurnService:
    catalog = Catalog(
        lambda: pool.available_models,
        configured=[m.id for m in config.pool.models],
        byok_names=byok_names(config),
        aliases=config.models.aliases,
    )
    return TurnService(pool, store, base_settings(config), catalog, deadlines(config), broker, tool_limits(config),
                       build_ledger(config, store, catalog), cluster, attachment_limits(config))


def configured_app(config: Config, turns: TurnService, auth: Authenticator) -> web.Application:
    """The HTTP app ``config`` describes over ``turns`` (the daemon's, and the tests' harness)."""
    server = config.server
    return build_app(turns, max_body_bytes=server.max_body_bytes, keepalive_s=server.keepalive_s,
                     body_timeout_s=server.body_timeout_s, auth=auth, metrics=Metrics(turns),
                     default_autonomy=config.droid.autonomy,
                     browser_policy=BrowserPolicy.of(server.host, server.allowed_hosts, server.cors_origins))


def attachment_limits(config: Config) -> Limits:
    a = config.attachments
    return Limits(a.max_image_bytes, a.max_document_bytes, a.max_count, a.max_total_bytes, a.fetch_urls,
                  a.fetch_timeout_s)


def pricing(config: Config) -> Pricing:
    p = config.pricing
    return Pricing(p.multipliers, p.cached_factor, p.usd_per_million, p.allow_unpriced)


def build_ledger(config: Config, store: SessionStore, catalog: Catalog) -> Ledger:
    return Ledger(store, catalog, pricing(config), config.budgets.limits, config.budgets.warn_at)


@asynccontextmanager
async def tool_endpoint(broker: ToolBroker) -> AsyncIterator[str]:
    """droidpool's internal MCP endpoint for client tools, on a loopback port of its own; the
    broker's url while it runs."""
    runner = web.AppRunner(build_mcp_app(broker), access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        broker.url = f"http://{host}:{port}/mcp"
        log.info("droidpool.tool_endpoint", url=broker.url)
        yield broker.url
    finally:
        broker.url = ""
        await runner.cleanup()


@asynccontextmanager
async def running_turns(config: Config, pool: Pool, store: SessionStore) -> AsyncIterator[TurnService]:
    """The turn service with its tasks and, when client tools are on, its MCP endpoint."""
    broker = ToolBroker()
    reasons = await anyio.to_thread.run_sync(turn_end_reasons, pool.spec.argv[0])
    unmapped = sorted(set(reasons or ()) - set(failures.TABLE) - failures.SUCCESS_REASONS)
    if unmapped:  # a newer droid: these fail as 502s naming the reason until droidpool maps them
        log.warning("droidpool.unmapped_turn_end_reasons", reasons=unmapped)
    async with AsyncExitStack() as stack:
        if config.tools.enabled:
            await stack.enter_async_context(tool_endpoint(broker))
            exemptions = await anyio.to_thread.run_sync(deferral_exemptions, pool.spec.argv[0])
            direct = offered_directly(exemptions)
            broker.offered = {True: "direct", False: "deferred", None: "unknown"}[direct]
            if direct is not True:
                log.warning("droidpool.client_tools_deferred" if direct is False else "droidpool.client_tools_mode_unknown",
                            detail="droid may hide client tools behind ToolSearch (an extra LLM round trip); "
                                   "droidpool_tool_events_total{event=\"tools_deferred\"} counts the turns it happens in",
                            exemptions=exemptions)
        cluster = build_cluster(config, pool, store)
        turns = build_turns(config, pool, store, broker, cluster)
        await turns.sessions.recover_interrupted(cluster.node_id if cluster is not None else None)
        await turns.ledger.sync()  # the budgets' windows are read now, not by the first request
        async with turns.running():
            if cluster is None:
                yield turns
                return
            await cluster.beat()
            log.info("nodes.joined", node=cluster.node_id, url=cluster.url, nodes=sorted(cluster.nodes))
            async with anyio.create_task_group() as tg:
                tg.start_soon(cluster.run)
                try:
                    yield turns
                finally:
                    tg.cancel_scope.cancel()
                    with anyio.CancelScope(shield=True):
                        try:
                            await cluster.leave()
                        except Exception as exc:  # noqa: BLE001 - the store is down: others see it dead
                            log.error("nodes.leave_failed", node=cluster.node_id, error=str(exc))


async def serve(config: Config, reload: Callable[[], Config] | None = None) -> None:
    """Run until SIGTERM or SIGINT; SIGHUP re-reads the config with ``reload``."""
    await Daemon(config, reload).run()


class Daemon:
    """Startup → main loop → shutdown. Signal handlers only queue; the loop acts."""

    def __init__(self, config: Config, reload: Callable[[], Config] | None = None) -> None:
        self.config = config
        self._reload = reload
        self._stop = anyio.Event()
        self.notifier = Notifier()
        self.pool: Pool | None = None
        self.turns: TurnService | None = None
        self.auth = Authenticator([])

    async def run(self) -> None:
        spec = launch_spec(self.config)  # a StartupError here reaches the CLI as a plain message
        kill_leftover_workers(self.config.worker_cwd)
        try:
            self.auth = Authenticator(load_keys(self.config, os.environ))
        except ConfigError as exc:
            raise StartupError(str(exc)) from None
        log.info("droidpool.auth", keys=self.auth.key_count)
        if any(m.spares != -1 or m.max_spares != -1 for m in self.config.pool.models):
            log.warning("droidpool.config_obsolete", key="pool.models[].spares",
                        detail="ignored: any idle worker serves any model; set pool.idle_min and pool.idle_max")
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._handle_signals, signals)
                await self._serve(spec, tg)
                tg.cancel_scope.cancel()

    async def _handle_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            log.info("droidpool.signal", signal=signal.Signals(signum).name)
            if signum == signal.SIGHUP:
                self.reload()
            else:
                self._stop.set()

    def reload(self) -> None:
        """Apply a re-read config to the running pool and deadlines; turns keep running."""
        if self._reload is None or self.pool is None or self.turns is None:
            return
        self.notifier.send(reloading=1, status="reloading configuration")
        try:
            new = self._reload()
            spec = launch_spec(new)
            keys = load_keys(new, os.environ)
        except (ConfigError, StartupError) as exc:
            log.error("droidpool.reload_failed", error=str(exc))
            self.notifier.send(ready=1, status=f"reload failed: {exc}")
            return
        restart_only = [
            key for key in ("host", "port", "state_dir", "max_body_bytes", "allowed_hosts", "cors_origins")
            if getattr(new.server, key) != getattr(self.config.server, key)
        ] + (["tools.enabled"] if new.tools.enabled != self.config.tools.enabled else [])
        if restart_only or new.store != self.config.store:
            log.warning("droidpool.reload_needs_restart", keys=restart_only or ["store"])
        self.pool.reconfigure(pool_policy(new), spec)
        self.auth.set_keys(keys)
        self.turns.deadlines = deadlines(new)
        self.turns.tool_limits = tool_limits(new)
        self.turns.attachment_limits = attachment_limits(new)
        self.turns.catalog.aliases = dict(new.models.aliases)
        self.turns.ledger.reconfigure(pricing(new), new.budgets.limits, new.budgets.warn_at)
        if new.server.log_level != self.config.server.log_level:
            logs.configure(new.server.log_level)
        self.config = new
        log.info("droidpool.reloaded", pool=repr(self.pool))
        self.notifier.send(ready=1, status=self._status())

    def _status(self) -> str:
        if self.pool is None:
            return "starting"
        counts = self.pool.counts()
        return (f"{counts['busy']} busy, {counts['idle']} idle, {counts['ready']} spare, "
                f"{counts['starting']} starting, {counts['queued']} queued")

    async def _serve(self, spec: LaunchSpec, tg: anyio.abc.TaskGroup) -> None:
        config = self.config
        store = open_store(store_url(config, os.environ), config.store_path, config.store.session_ttl_s)
        await store.open()
        try:
            async with open_configured_pool(config, spec) as pool, running_turns(config, pool, store) as turns:
                self.pool = pool
                self.turns = turns
                app = configured_app(config, turns, self.auth)
                # On shutdown aiohttp stops listening, lets running handlers finish for
                # drain_grace_s, then cancels them: a cancelled turn is interrupted, not lost.
                runner = make_runner(app, handle_signals=False, shutdown_timeout=config.server.drain_grace_s)
                await runner.setup()
                try:
                    await self._listen(runner)
                    tg.start_soon(self._announce_ready, pool, tg)
                    tg.start_soon(_sweep, turns, config)
                    await self._stop.wait()
                    log.info("droidpool.stopping", pool=repr(pool))
                    if turns.cluster is not None:  # the other nodes stop forwarding here
                        turns.cluster.state = "draining"
                        await turns.cluster.beat()
                    self.notifier.send(stopping=1, status="draining")
                    pool.begin_drain()
                finally:
                    await runner.cleanup()
        finally:
            await store.close()
        log.info("droidpool.stopped")

    async def _listen(self, runner: web.AppRunner) -> None:
        host, port = self.config.server.host, self.config.server.port
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        log.info("droidpool.listening", host=host, port=port)

    async def _announce_ready(self, pool: Pool, tg: anyio.abc.TaskGroup) -> None:
        """READY=1 once listening and the configured spares are warm (or their start failed);
        the watchdog starts after it."""
        warm = await pool.wait_warm(self.config.pool.spawn_timeout_s)
        log.info("droidpool.ready" if warm else "droidpool.not_warm", pool=repr(pool), cause=pool.last_spawn_error)
        self.notifier.send(ready=1, status=self._status())
        if self.notifier.watchdog_interval_s:
            tg.start_soon(self._watchdog, pool, self.notifier.watchdog_interval_s)
        while True:
            await anyio.sleep(5)
            self.notifier.send(status=self._status())

    async def _watchdog(self, pool: Pool, interval: float) -> None:
        """WATCHDOG=1 only while the supervisor loop is making progress."""
        while True:
            if pool.supervisor_alive(max_age_s=max(5.0, interval * 2)):
                self.notifier.send(watchdog=1)
            else:
                log.error("droidpool.supervisor_stalled", pool=repr(pool))
            await anyio.sleep(interval)


def kill_leftover_workers(root: Path) -> list[int]:
    """A droidpool that died without stopping its workers (SIGKILL, OOM) leaves them running:
    idle ones exit on their own (stdin closed), busy ones finish their turn and could write
    to a session this daemon is about to load. Their whole process groups are killed."""
    leftovers = procfs.leftover_workers(root, os.getpid())
    for pid in leftovers:
        try:
            os.killpg(pid, signal.SIGKILL)  # each worker leads its own process group
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    if leftovers:
        log.warning("droidpool.killed_leftover_workers", pids=leftovers)
    return leftovers


IMAGE_DIR_GRACE_S = 600.0  # a folder a worker has just made is known once its turn ends


async def _prune_images(sessions_dir: Path, pool: Pool) -> None:
    """droid's temp image folders that no live worker owns (left by killed processes)."""
    live = {w.image_dir for w in pool.workers if w.image_dir and w.alive}
    stale = await anyio.to_thread.run_sync(
        images.stale_dirs, images.images_root(sessions_dir), live, time.time(), IMAGE_DIR_GRACE_S)
    if stale:
        freed = await anyio.to_thread.run_sync(images.remove, stale)
        log.info("store.pruned_images", folders=len(stale), bytes=freed)


async def _sweep(turns: TurnService, config: Config, every_s: float = 600.0) -> None:
    """Every ``every_s``: delete droid's files of sessions that expired or nobody knows (never
    those a live worker holds), then the expired sessions from the store (and their client tools).
    The droid sessions folder stays as small as the live sessions: droid scans it when loading a
    session."""
    sessions_dir = droid_sessions_dir(config)
    pool = turns.pool
    while True:
        if config.store.prune_files:
            known = await turns.store.all_ids()
            protected = frozenset(w.session_id for w in pool.workers if w.session_id)
            plan = await anyio.to_thread.run_sync(
                plan_prune, sessions_dir, config.worker_cwd, known, time.time(), config.store.session_ttl_s, protected)
            if plan.sessions or plan.workdirs:
                freed = plan.bytes
                await anyio.to_thread.run_sync(apply_prune, plan)
                log.info("store.pruned_files", sessions=len(plan.sessions), workdirs=len(plan.workdirs), bytes=freed,
                         kept=plan.kept)
        await _prune_images(sessions_dir, pool)
        swept = await turns.sweep()
        if swept:
            log.info("store.swept", sessions=swept)
        await anyio.sleep(every_s)
