"""``droidpool doctor``: check everything an operator gets wrong, and say what to fix."""

from __future__ import annotations

import json
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import anyio

from droidpool.api.browser import is_loopback
from droidpool.config import ALL_TOOL_IDS, Config
from droidpool.droid.launch import (
    StartupError,
    droid_settings_path,
    launch_spec,
    resolve_binary,
    worker_env,
)
from droidpool.droid.minted import check_loaded, mint
from droidpool.droid.rpc import DroidRequestError
from droidpool.droid.sessions import droid_sessions_dir
from droidpool.droid.spec import SessionSettings
from droidpool.droid.worker import Worker

TESTED_VERSION = "0.225.2"

Report = Callable[[str, str, str], None]  # (level: ok|warn|fail, what, fix)


async def run_checks(config: Config, report: Report) -> bool:
    """Each check reports; returns False if any failed (warnings don't fail)."""
    failed = False

    def fail(what: str, fix: str) -> None:
        nonlocal failed
        failed = True
        report("fail", what, fix)

    try:
        binary = resolve_binary(config.droid.binary)
    except StartupError as exc:
        fail(str(exc), "set droid.binary to the droid executable's path")
        return False
    report("ok", f"droid binary: {binary}", "")
    try:
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30,
                                 stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        fail(f"droid --version failed: {exc}", "reinstall droid for this platform")
        return False
    printed = version.stdout.strip() or version.stderr.strip()
    if version.returncode != 0:
        fail(f"droid --version exited {version.returncode}: {printed}", "reinstall droid for this platform")
        return False
    if printed == TESTED_VERSION:
        report("ok", f"droid version {printed}", "")
    else:
        report("warn", f"droid version {printed}; droidpool was tested with {TESTED_VERSION}",
               f"npm install @factory/cli-linux-x64@{TESTED_VERSION}")

    _check_credentials(config, report, fail)
    _check_writable(config.state_dir, "state directory", report, fail)
    _check_port(config, report)
    _report_browsers(config, report)
    if not await _check_worker(config, report, fail):
        return False
    return not failed


def _check_credentials(config: Config, report: Report, fail: Callable[[str, str], None]) -> None:
    env = worker_env(config)
    settings = droid_settings_path(config)
    custom: list[str] = []
    try:
        data = json.loads(settings.read_text())
        custom = [str(m.get("model")) for m in data.get("customModels", []) if isinstance(m, dict)]
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        fail(f"{settings} is unreadable: {exc}", "fix the JSON, or remove the file")
        return
    has_key = bool(env.get("FACTORY_API_KEY"))
    if custom:
        report("ok", f"BYOK custom models in {settings}: {', '.join(custom)}", "")
    if has_key:
        report("ok", "FACTORY_API_KEY is set for the workers (value not shown)", "")
        if config.droid.airgap:
            report("warn", "droid.airgap = true refuses Factory-hosted models despite FACTORY_API_KEY",
                   "set droid.airgap = false to use Factory-hosted models")
    if not custom and not has_key:
        fail("droid has no credentials: no FACTORY_API_KEY and no BYOK custom model",
             f"export FACTORY_API_KEY (systemd: EnvironmentFile=), or define customModels in {settings}")


def _check_writable(path: Path, what: str, report: Report, fail: Callable[[str, str], None]) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as exc:
        fail(f"{what} {path} is not writable: {exc.strerror or exc}",
             "create it for the daemon's user, or set server.state_dir")
        return
    report("ok", f"{what} {path} is writable", "")


def _report_browsers(config: Config, report: Report) -> None:
    s = config.server
    hosts = ", ".join(["localhost", "127.0.0.1", "[::1]", *s.allowed_hosts])
    if is_loopback(s.host) or s.allowed_hosts:
        report("ok", f"Host headers answered: {hosts} (server.allowed_hosts adds names)", "")
    else:
        report("warn", f"{s.host} is not loopback and server.allowed_hosts is empty: any Host is answered",
               "set server.allowed_hosts to the names clients use (a DNS-rebinding guard)")
    origins = ", ".join(s.cors_origins) or "none: requests from web pages are refused"
    report("ok", f"browser origins allowed (server.cors_origins): {origins}", "")


def _check_port(config: Config, report: Report) -> None:
    host, port = config.server.host, config.server.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            report("warn", f"{host}:{port} is not free ({exc.strerror}): another droidpool running?",
                   "stop it, or choose server.port")
            return
    report("ok", f"{host}:{port} is free", "")


async def _check_worker(config: Config, report: Report, fail: Callable[[str, str], None]) -> bool:
    worker = Worker(launch_spec(config))
    async with anyio.create_task_group() as tg:
        try:
            started = time.monotonic()
            await worker.start(tg)
            models = await worker.list_models(config.pool.spawn_timeout_s)
            report("ok", f"a worker started and answered list_models in {time.monotonic() - started:.2f} s", "")
            if not models:
                fail("droid lists no models", "define a BYOK custom model or set FACTORY_API_KEY")
                return False
            report("ok", f"models: {', '.join(str(m.get('id')) for m in models)}", "")
            for spec in config.pool.models:
                if spec.id and spec.id not in {m.get("id") for m in models} and not spec.id.startswith("custom:"):
                    report("warn", f"pool.models names {spec.id!r}, which droid does not list", "fix pool.models")
            session = await worker.initialize(SessionSettings(model_id=None), config.pool.spawn_timeout_s)
            report("ok", f"a session initialized ({session})", "")
            await _check_minting(config, worker, report)
            return True
        except Exception as exc:  # noqa: BLE001 - every failure is a finding here
            fail(f"the worker failed: {exc} {worker.stderr_tail(300)}".strip(),
                 "run droid by hand: droid exec --input-format stream-jsonrpc --output-format stream-jsonrpc")
            return False
        finally:
            await worker.stop()
            tg.cancel_scope.cancel()
    return False  # pragma: no cover - the task group always returns from inside


async def _check_minting(config: Config, worker: Worker, report: Report) -> None:
    """The pool's self-test: a session droidpool writes loads as written (one empty message,
    its system prompt and working directory), so any idle worker can start a new conversation."""
    if not config.pool.mint_sessions:
        report("ok", "minted sessions are off (pool.mint_sessions = false): a new process per conversation", "")
        return
    settings = SessionSettings(system_prompt="droidpool doctor", disabled_tool_ids=ALL_TOOL_IDS)
    started = time.monotonic()
    try:
        minted = mint(droid_sessions_dir(config), config.worker_cwd / "self-test", settings, "droidpool")
        result = await worker.load_session(minted.session_id, config.pool.spawn_timeout_s)
        problems = check_loaded(result, minted, settings)
    except (OSError, DroidRequestError) as exc:
        problems = [str(exc)]
    if problems:
        report("warn", f"droid does not load minted sessions as written ({'; '.join(problems)})",
               "droidpool falls back to a new droid process per new conversation (~0.6 s each); "
               f"check the droid version ({TESTED_VERSION} is tested)")
    else:
        report("ok", f"minted sessions load as written ({(time.monotonic() - started) * 1000:.0f} ms): "
                     "any idle worker starts a new conversation", "")


def format_line(level: str, what: str, fix: str) -> str:
    tag = {"ok": "ok", "warn": "warn", "fail": "FAIL"}[level]
    return f"[{tag}] {what}" + (f"\n       fix: {fix}" if fix and level != "ok" else "")

