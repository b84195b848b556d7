"""The daemon's life under systemd semantics: notify, watchdog, drain on SIGTERM, reload on SIGHUP."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from droidpool.daemon.systemd import Notifier
from tests.conftest import FAKE_DROID, Daemon, start_daemon, wait_until, write_config


def sections(tmp_path: Path, **pool: Any) -> dict[str, dict[str, Any]]:
    (tmp_path / "home").mkdir(exist_ok=True)
    return {
        "droid": {"binary": str(FAKE_DROID), "home": str(tmp_path / "home")},
        "pool": {"max_workers": 4, "models": [{"id": "custom:fake-model"}], "idle_min": 1, **pool},
        "server": {"drain_grace_s": 10.0},
    }


def post(daemon: Daemon, text: str, timeout: float = 30) -> tuple[int, Any]:
    request = urllib.request.Request(
        daemon.base_url + "/v1/chat/completions",
        data=json.dumps({"model": "custom:fake-model", "messages": [{"role": "user", "content": text}]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_notifier_is_a_no_op_outside_systemd() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_interval_s is None
    notifier.send(ready=1)  # nothing to send to: no error


def test_notify_ready_watchdog_stopping_in_order(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    received: list[str] = []
    done = threading.Event()

    def listen() -> None:
        while not done.is_set():
            try:
                received.append(sock.recv(4096).decode())
            except TimeoutError:
                continue

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    daemon = start_daemon(tmp_path, sections(tmp_path), env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    try:
        wait_until(lambda: any("READY=1" in m for m in received), 20, "READY=1")
        ready_at = next(i for i, m in enumerate(received) if "READY=1" in m)
        # READY comes only once the configured spare is warm.
        status, body = daemon.get("/readyz")
        assert body["workers"]["ready"] >= 1
        assert "spare" in received[ready_at]
        wait_until(lambda: sum("WATCHDOG=1" in m for m in received) >= 2, 10, "two WATCHDOG=1")
    finally:
        assert daemon.stop() == 0
        wait_until(lambda: any("STOPPING=1" in m for m in received), 5, "STOPPING=1")
        done.set()
        thread.join(timeout=5)
        sock.close()
    kinds = [k for m in received for k in ("READY=1", "WATCHDOG=1", "STOPPING=1") if k in m]
    assert kinds[0] == "READY=1" and kinds[-1] == "STOPPING=1"
    assert "WATCHDOG=1" in kinds[1:-1]


def test_sigterm_lets_a_running_turn_finish_and_refuses_new_ones(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, sections(tmp_path))
    result: list[tuple[int, Any]] = []
    slow = threading.Thread(target=lambda: result.append(post(daemon, "long [[slow:400]]")))
    slow.start()
    wait_until(lambda: daemon.get("/readyz")[1]["workers"]["busy"] == 1, 10, "the turn to start")
    daemon.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    # Draining: the listener is closed (or, on a kept-alive connection, a 503).
    try:
        status, _ = post(daemon, "late", timeout=5)
        assert status == 503
    except (urllib.error.URLError, ConnectionError):
        pass
    slow.join(timeout=20)
    assert result and result[0][0] == 200  # the running turn completed within the grace
    assert result[0][1]["choices"][0]["message"]["content"].endswith("[turns=1]")
    assert daemon.process.wait(timeout=20) == 0


def test_sighup_reloads_the_pool_without_dropping_a_turn(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, sections(tmp_path))
    try:
        result: list[tuple[int, Any]] = []
        turn = threading.Thread(target=lambda: result.append(post(daemon, "during reload [[slow:300]]")))
        turn.start()
        wait_until(lambda: daemon.get("/readyz")[1]["workers"]["busy"] == 1, 10, "the turn to start")
        write_config(tmp_path / "droidpool.toml", {
            **sections(tmp_path, models=[{"id": "custom:fake-model"}], idle_min=2),
            "server": {"port": daemon.port, "state_dir": str(tmp_path / "state")},
        })
        daemon.process.send_signal(signal.SIGHUP)
        wait_until(lambda: daemon.get("/readyz")[1]["workers"]["ready"] == 2, 15, "two spares after reload")
        turn.join(timeout=20)
        assert result and result[0][0] == 200
        assert "droidpool.reloaded" in daemon.log()
    finally:
        assert daemon.stop() == 0


def test_a_restarted_daemon_kills_the_workers_a_killed_one_left(tmp_path: Path) -> None:
    """A worker left by a daemon that was SIGKILLed (here: planted by the test, its stdin held
    open so it stays alive) is killed at start-up; a droid elsewhere is left alone."""
    import subprocess
    import sys

    workdir = tmp_path / "state" / "work"
    workdir.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    argv = [sys.executable, str(FAKE_DROID), "exec", "--input-format", "stream-jsonrpc", "--output-format", "stream-jsonrpc"]
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir(exist_ok=True)
    leftover = subprocess.Popen(argv, cwd=workdir, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    bystander = subprocess.Popen(argv, cwd=elsewhere, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
                                 start_new_session=True)
    try:
        time.sleep(0.3)
        daemon = start_daemon(tmp_path, sections(tmp_path))
        try:
            assert leftover.wait(timeout=10) == -signal.SIGKILL
            assert bystander.poll() is None
            assert "droidpool.killed_leftover_workers" in daemon.log()
        finally:
            assert daemon.stop() == 0
    finally:
        for process in (leftover, bystander):
            process.kill()
            process.wait(timeout=10)
