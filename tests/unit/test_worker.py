"""A worker against the fake droid: turns, interrupts, crashes, bad output, and reaping."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
import structlog
from structlog.testing import LogCapture

from droidpool import errors
from droidpool.droid import worker as worker_module
from droidpool.droid.launch import DROID_ARGS
from droidpool.droid.protocol import TextDelta, TurnCompleted
from droidpool.droid.worker import LaunchSpec, SessionSettings, Worker, WorkerState
from tests.conftest import FAKE_DROID

pytestmark = pytest.mark.anyio


def spec(tmp_path: Path, policy: str = "cancel", max_line: int = 8 * 1024 * 1024, **env: str) -> LaunchSpec:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return LaunchSpec(
        argv=(sys.executable, str(FAKE_DROID), *DROID_ARGS),
        env={**os.environ, "HOME": str(home), **env},
        cwd=str(tmp_path),
        machine_id="test",
        permission_policy=policy,
        max_line_bytes=max_line,
        stop_grace_s=1.0,
    )


@asynccontextmanager
async def running(launch: LaunchSpec) -> AsyncIterator[Worker]:
    worker = Worker(launch)
    async with anyio.create_task_group() as tg:
        await worker.start(tg)
        try:
            with anyio.fail_after(15):
                await worker.initialize(SessionSettings(model_id="custom:fake-model"), timeout=10)
            yield worker
        finally:
            with anyio.fail_after(15):
                await worker.stop()
            tg.cancel_scope.cancel()
    assert worker.state is WorkerState.DEAD
    assert worker.exit_code is not None  # reaped


async def run_turn(worker: Worker, text: str) -> tuple[str, TurnCompleted]:
    pieces = []
    with anyio.fail_after(15):
        async with worker.turn(text, interrupt_grace_s=2) as stream:
            async for event in stream:
                if isinstance(event, TextDelta):
                    pieces.append(event.text)
                if isinstance(event, TurnCompleted):
                    return "".join(pieces), event
    raise AssertionError("turn ended without TurnCompleted")


async def test_turns_stream_deltas_and_keep_history(tmp_path: Path) -> None:
    async with running(spec(tmp_path)) as worker:
        text, done = await run_turn(worker, "hello [[usage:7,3]]")
        assert done.reason == "completed" and done.usage.input_tokens == 7 and done.usage.output_tokens == 3
        assert text.endswith("[turns=1]")
        text, _ = await run_turn(worker, "again")
        assert text.endswith("[turns=2]")
        assert "turns=2" in repr(worker) and "pid=" in repr(worker)


async def test_leaving_a_turn_early_interrupts_it_and_the_worker_stays_usable(tmp_path: Path) -> None:
    async with running(spec(tmp_path)) as worker:
        started = time.monotonic()
        with anyio.fail_after(10):
            async with worker.turn("wait [[hang]]", interrupt_grace_s=2):
                pass  # the client went away before any token
        assert time.monotonic() - started < 2
        assert worker.alive
        text, done = await run_turn(worker, "after")
        assert done.reason == "completed" and text


async def test_crash_mid_turn_raises_worker_crashed_with_stderr(tmp_path: Path) -> None:
    async with running(spec(tmp_path)) as worker:
        with pytest.raises(errors.WorkerCrashed) as info:
            await run_turn(worker, "boom [[crash]]")
        assert "exit code 1" in info.value.message
        assert not worker.alive


async def test_garbage_and_huge_lines_are_skipped(tmp_path: Path) -> None:
    async with running(spec(tmp_path, max_line=1024 * 1024)) as worker:
        text, done = await run_turn(worker, "noise [[garbage]]")
        assert done.reason == "completed" and text.endswith("[turns=1]")
        text, done = await run_turn(worker, "big [[huge]]")  # 5 MiB line > 1 MiB limit
        assert done.reason == "completed" and text.endswith("[turns=2]")
        assert worker.alive


@pytest.mark.parametrize("policy", ["cancel", "proceed_once"])
async def test_permission_requests_are_answered_by_policy(tmp_path: Path, policy: str) -> None:
    async with running(spec(tmp_path, policy=policy)) as worker:
        text, _ = await run_turn(worker, "tool [[permission]]")
        assert f"[permission={policy}]" in text


async def test_stop_kills_a_worker_that_ignores_sigterm_and_its_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    launch = spec(tmp_path, FAKE_DROID_IGNORE_SIGTERM="1", FAKE_DROID_SPAWN_CHILD="1",
                  FAKE_DROID_CHILD_PIDFILE=str(pidfile))
    async with running(launch) as worker:
        with anyio.fail_after(5):
            while not pidfile.exists() or not pidfile.read_text().strip():
                await anyio.sleep(0.02)
        child = int(pidfile.read_text())
        async with worker.turn("[[hang]]", interrupt_grace_s=1):
            pass
    # running() asserted the worker is reaped; the grandchild in its group is gone too.
    with anyio.fail_after(5):
        while Path(f"/proc/{child}").exists() and "Z" not in Path(f"/proc/{child}/stat").read_text().split()[2]:
            await anyio.sleep(0.05)


async def test_spawn_failure_is_reported_with_stderr(tmp_path: Path) -> None:
    worker = Worker(spec(tmp_path, FAKE_DROID_FAIL_START="1"))
    async with anyio.create_task_group() as tg:
        await worker.start(tg)
        with pytest.raises(errors.WorkerCrashed):
            await worker.list_models(timeout=10)
        await worker.stop()
        tg.cancel_scope.cancel()
    assert worker.exit_code == 1


async def test_missing_binary_is_unavailable(tmp_path: Path) -> None:
    launch = LaunchSpec(argv=(str(tmp_path / "nope"),), env={}, cwd=str(tmp_path), machine_id="t")
    async with anyio.create_task_group() as tg:
        with pytest.raises(errors.Unavailable, match="cannot start droid"):
            await Worker(launch).start(tg)


def test_launch_spec_repr_never_shows_the_environment(tmp_path: Path) -> None:
    launch = spec(tmp_path, FACTORY_API_KEY="fk-secret-value")
    assert "fk-secret-value" not in repr(launch)
    assert "fk-secret-value" not in repr(Worker(launch))


async def test_a_session_is_named_at_init_so_droid_asks_no_title(tmp_path: Path) -> None:
    log = tmp_path / "methods.log"
    async with running(spec(tmp_path, FAKE_DROID_LOG=str(log))):
        pass
    methods = log.read_text().split()
    assert methods.index("droid.rename_session") == methods.index("droid.initialize_session") + 1
    (tmp_path / "b").mkdir()
    untitled = dataclasses.replace(spec(tmp_path / "b", FAKE_DROID_LOG=str(tmp_path / "b.log")), session_title=None)
    async with running(untitled):
        pass
    assert "droid.rename_session" not in (tmp_path / "b.log").read_text()



async def test_a_workers_own_tasks_log_without_the_context_of_the_request_that_spawned_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The module's logger, capturing at every level whatever structlog was configured with before.
    captured = LogCapture()
    monkeypatch.setattr(worker_module, "log", structlog.wrap_logger(
        structlog.PrintLogger(), processors=[structlog.contextvars.merge_contextvars, captured],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG)))
    worker = Worker(spec(tmp_path, FAKE_DROID_FAIL_START="1"))  # exits at once: its reader logs worker.exited
    exited = anyio.Event()
    worker.on_exit = lambda _: exited.set()
    async with anyio.create_task_group() as tg:
        with structlog.contextvars.bound_contextvars(request_id="req-spawner"):
            await worker.start(tg)
            worker_module.log.info("request.line")
            with anyio.fail_after(10):
                await exited.wait()
        await worker.stop()
        tg.cancel_scope.cancel()
    assert next(e for e in captured.entries if e["event"] == "request.line")["request_id"] == "req-spawner"
    line = next(e for e in captured.entries if e["event"] == "worker.exited")
    assert line["worker"] == worker.id and "request_id" not in line
