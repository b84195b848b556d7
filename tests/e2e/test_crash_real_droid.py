"""A crash mid-turn, with the real droid CLI and the fake LLM: after a restart, droid's history of
each interrupted conversation holds no turn its client never saw the answer to.

Two conversations run a first turn, then a second one whose upstream never answers (the model
``custom:fake-hang``); droidpool is SIGKILLed while droid waits for it, and restarted on the same
state directory and droid HOME. The next turn of each (one named by ``X-Session-Id``, one a
stateless resend of its history) must reach the LLM with the first turn in its context and
without the interrupted turn's user message, on the same session.

Two crashes: the host's (the daemon and its droid workers die at once), and the daemon's alone
(SIGKILL or the OOM killer: each worker leads its own process group and outlives it; it sees its
stdin close and ends its turn by itself before the restarted daemon starts).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    Daemon,
    FakeLLMProcess,
    descendants,
    start_daemon,
    wait_until,
    write_droid_home,
)

pytestmark = pytest.mark.real_droid

ECHO = "custom:fake-echo"  # answers at once with what it received
HANG = "custom:fake-hang"  # never answers: the turn is mid-flight when the daemon dies


def sections(real_droid: str, home: Path, state: Path) -> dict[str, dict[str, Any]]:
    return {
        "server": {"state_dir": str(state)},
        "droid": {"binary": real_droid, "home": str(home), "airgap": True},
        "pool": {"max_workers": 3, "models": [{"id": ECHO}], "idle_min": 1, "queue_timeout_s": 60.0},
        "deadlines": {"first_token_s": 120.0, "turn_s": 300.0},
    }


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def workers_in(root: Path) -> list[int]:
    """Live processes working under ``root`` (droidpool's droid workers run in <state>/work/...)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "cwd").startswith(str(root)) and alive(int(entry.name)):
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_until(lambda: not [p for p in pids if alive(p)], 10, "the droid workers to die")


@pytest.fixture
def orphans() -> Iterator[list[Path]]:
    """Worker directories whose droid processes must not outlive the test, whatever happens."""
    roots: list[Path] = []
    yield roots
    for root in roots:
        kill_all(workers_in(root))


def chat(daemon: Daemon, messages: list[Any], model: str = ECHO, headers: dict[str, str] | None = None,
         timeout: float = 90) -> tuple[int, dict[str, str], Any]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        daemon.base_url + "/v1/chat/completions",
        data=json.dumps({"model": model, "messages": messages}).encode(),
        headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.load(exc)


def start_hanging_turn(daemon: Daemon, messages: list[Any], headers: dict[str, str]) -> socket.socket:
    """A streamed turn on the hanging model; its socket stays open until the daemon dies."""
    body = json.dumps({"model": HANG, "stream": True, "messages": messages}).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=60)
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def upstream(fake_llm: FakeLLMProcess, marker: str) -> list[dict[str, Any]]:
    """The answer requests droid sent the LLM whose last user message holds ``marker``."""
    def last_user(request: dict[str, Any]) -> str:
        users = [m for m in request["messages"] if m.get("role") == "user"]
        return json.dumps(users[-1].get("content")) if users else ""

    return [r for r in fake_llm.answer_requests(marker) if marker in last_user(r)]


@pytest.mark.parametrize("crash", ["host", "daemon"])
def test_no_unanswered_user_message_survives_a_crash(
    tmp_path: Path, real_droid: str, fake_llm: FakeLLMProcess, orphans: list[Path], crash: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    words = {c: {turn: f"{c}-{turn}-{tag}" for turn in ("one", "interrupted", "three", "four")}
             for c in ("alpha", "bravo")}
    home = write_droid_home(tmp_path / "home", fake_llm.url)
    state = tmp_path / "state"
    orphans.append(state / "work")
    config = sections(real_droid, home, state)
    (tmp_path / "first").mkdir()
    daemon = start_daemon(tmp_path / "first", config, ready_timeout=60)
    hanging: list[socket.socket] = []
    try:
        # alpha: named by X-Session-Id. bravo: stateless, its history resent each time.
        status, headers, answer = chat(daemon, [{"role": "user", "content": words["alpha"]["one"]}])
        assert status == 200, answer
        alpha = headers["X-Session-Id"]
        bravo_history: list[Any] = [{"role": "user", "content": words["bravo"]["one"]}]
        status, headers, answer = chat(daemon, bravo_history)
        assert status == 200, answer
        bravo = headers["X-Session-Id"]
        bravo_history.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})

        # Second turns, on the model that never answers: droid has written their user messages
        # to its session files once the LLM has their requests.
        hanging.append(start_hanging_turn(
            daemon, [{"role": "user", "content": words["alpha"]["interrupted"]}], {"X-Session-Id": alpha}))
        hanging.append(start_hanging_turn(
            daemon, [*bravo_history, {"role": "user", "content": words["bravo"]["interrupted"]}], {}))
        wait_until(lambda: all(upstream(fake_llm, words[c]["interrupted"]) for c in ("alpha", "bravo")), 60,
                   "both second turns to reach the LLM")
        time.sleep(0.3)

        workers = descendants(daemon.process.pid)
        assert workers
        daemon.process.kill()
        daemon.process.wait(timeout=10)
        if crash == "host":
            kill_all(workers)
        else:
            # The workers outlive the daemon: they see their stdin close and end on their own.
            wait_until(lambda: not [p for p in workers if alive(p)], 30, "the orphaned droid workers to exit")
    finally:
        for sock in hanging:
            sock.close()
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait(timeout=10)

    (tmp_path / "second").mkdir()
    daemon = start_daemon(tmp_path / "second", config, ready_timeout=60)
    try:
        recovered = [json.loads(line) for line in daemon.log().splitlines() if '"session.recovered"' in line]
        assert sorted(r["session"] for r in recovered) == sorted([alpha, bravo]), daemon.log()[-3000:]

        # alpha, by its id.
        status, headers, answer = chat(daemon, [{"role": "user", "content": words["alpha"]["three"]}],
                                       headers={"X-Session-Id": alpha})
        assert status == 200 and headers["X-Session-Id"] == alpha, answer
        # bravo resends its history: the second turn never got an answer, so it is not in it.
        status, headers, answer = chat(daemon, [*bravo_history, {"role": "user", "content": words["bravo"]["three"]}])
        assert status == 200, answer
        assert headers["X-Session-Id"] == bravo, "the stateless resend did not find its session again"

        problems = []
        for conversation in ("alpha", "bravo"):
            (seen,) = upstream(fake_llm, words[conversation]["three"])
            context = json.dumps(seen["messages"])
            if words[conversation]["one"] not in context:
                problems.append(f"{conversation}: the first turn is missing from the LLM's context")
            if words[conversation]["interrupted"] in context:
                users = [m["content"] for m in seen["messages"] if m["role"] == "user"][1:]
                problems.append(f"{conversation}: the interrupted turn's user message reached the LLM: {users}")
        file_lines = {}
        for path in (home / ".factory" / "sessions").glob("*/*.jsonl"):
            if path.stem in (alpha, bravo):
                file_lines[path.stem] = [
                    (o.get("type"), o.get("reason") or json.dumps((o.get("message") or {}).get("content"))[:60])
                    for o in map(json.loads, path.read_text().splitlines())]
        assert not problems, (problems, recovered, file_lines)

        # The conversation goes on.
        status, headers, answer = chat(daemon, [{"role": "user", "content": words["alpha"]["four"]}],
                                       headers={"X-Session-Id": alpha})
        assert status == 200 and headers["X-Session-Id"] == alpha
        (seen,) = upstream(fake_llm, words["alpha"]["four"])
        context = json.dumps(seen["messages"])
        assert words["alpha"]["one"] in context and words["alpha"]["three"] in context
        assert words["alpha"]["interrupted"] not in context
        workers = descendants(daemon.process.pid)
    finally:
        code = daemon.stop()
    assert code == 0
    wait_until(lambda: not [p for p in workers if alive(p)], 10, "the workers to exit")
    assert "Traceback" not in daemon.log()
