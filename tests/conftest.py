"""Shared fixtures: the scripted fake LLM, droid HOMEs with BYOK models, and daemons to test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).parent
REPO = TESTS.parent
FAKE_DROID = TESTS / "fake_droid.py"
DEFAULT_REAL_DROID = "/opt/droid/node_modules/@factory/cli-linux-x64/bin/droid"

# Models the fake LLM serves, by scenario (the path in baseUrl picks the scenario).
FAKE_MODELS = {
    "fake-paced": "paced",
    "fake-echo": "echo",
    "fake-reasoning": "reasoning",
    "fake-401": "err401",
    "fake-hang": "hang",
    "fake-tools": "tools",
    "fake-json": "json",  # structured output: answers with JSON (tests/fakellm.py)
    "fake-vision": "echo",  # with "noImageSupport": false, droid sends images upstream
    "fake-vision-tools": "tools",  # the same for client tools returning images
    "fake-noimage": "echo",  # "noImageSupport": true: droid sends a text note instead of each image
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def real_droid_path() -> str | None:
    for candidate in (os.environ.get("DROIDPOOL_TEST_DROID"), DEFAULT_REAL_DROID):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("droid")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """One real PostgreSQL server for the whole run (tests/pgserver.py); each test takes its own
    database with ``postgres_server.database()``."""
    from tests.pgserver import PostgresServer, binaries

    if binaries() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is required in CI; tests/run.sh installs Debian's postgresql")
        pytest.skip("PostgreSQL not installed (Debian: apt-get install postgresql)")
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def real_droid() -> str:
    path = real_droid_path()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("the real droid CLI is required in CI; .ci/run installs it (DROIDPOOL_TEST_DROID)")
        pytest.skip("real droid CLI not installed (set DROIDPOOL_TEST_DROID)")
    return path


# --- the fake LLM ------------------------------------------------------------------------------


class FakeLLMProcess:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.fakellm", "--port", "0"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("PORT "):
            self.process.kill()
            raise RuntimeError(f"fake LLM did not start: {line!r}")
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def requests(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/_requests", timeout=10) as response:
            return list(json.load(response))

    def answer_requests(self, marker: str) -> list[dict[str, Any]]:
        """The non-title requests whose messages mention ``marker``."""
        return [
            r for r in self.requests()
            if not r["title"] and marker in json.dumps(r["messages"])
        ]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture(scope="session")
def fake_llm() -> Iterator[FakeLLMProcess]:
    server = FakeLLMProcess()
    yield server
    server.stop()


def write_droid_home(home: Path, llm_url: str) -> Path:
    """A droid HOME whose settings define one BYOK model per fake-LLM scenario."""
    factory = home / ".factory"
    factory.mkdir(parents=True, exist_ok=True)
    # Per-model settings keys beyond the common ones. droid 0.225.2 treats a custom model without
    # "noImageSupport" as one without image support (tests/fixtures/rpc_attach_noimage.*).
    extra: dict[str, dict[str, Any]] = {
        "fake-vision": {"noImageSupport": False},
        "fake-vision-tools": {"noImageSupport": False},
        "fake-noimage": {"noImageSupport": True},
    }
    models = [
        {
            "model": name,
            "displayName": name,
            "baseUrl": f"{llm_url}/s/{scenario}/v1",
            "apiKey": "dummy-test-key",
            "provider": "generic-chat-completion-api",
            "maxOutputTokens": 1000,
            **extra.get(name, {}),
        }
        for name, scenario in FAKE_MODELS.items()
    ]
    # One whose display name differs from its model name: droid lists it as custom:Fake-Named-0.
    models.append({"model": "fake-named", "displayName": "Fake Named", "baseUrl": f"{llm_url}/s/echo/v1",
                   "apiKey": "dummy-test-key", "provider": "generic-chat-completion-api", "maxOutputTokens": 1000})
    (factory / "settings.json").write_text(json.dumps({"customModels": models}))
    return home


# --- a droidpool daemon as a subprocess -----------------------------------------------------


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
            raise AssertionError("droidpool did not stop within the deadline after SIGTERM") from None


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps(sections))
    return path


def start_daemon(tmp: Path, sections: dict[str, dict[str, Any]], ready_timeout: float = 30,
                 env: dict[str, str] | None = None) -> Daemon:
    port = sections.get("server", {}).get("port") or free_port()
    sections = {**sections, "server": {"port": port, "state_dir": str(tmp / "state"), **sections.get("server", {})}}
    config = write_config(tmp / "droidpool.toml", sections)
    log_path = tmp / "droidpool.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "droidpool", "serve", "--config", str(config)],
            cwd=tmp,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("DROIDPOOL_")}, **(env or {})},
        )
    daemon = Daemon(process, port, log_path)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"droidpool exited with {process.returncode}:\n{daemon.log()}")
        try:
            status, body = daemon.get("/readyz")
        except (OSError, ValueError):
            return False
        return status == 200 and body["workers"]["ready"] + body["workers"]["idle"] >= 1 \
            and body["sessions"]["self_test"] != "pending"

    try:
        wait_until(ready, ready_timeout, "droidpool to become ready")
    except BaseException:
        daemon.stop()
        raise
    return daemon


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out
