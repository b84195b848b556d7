"""Quick checks of tests/fake_droid.py itself (the fake `droid` used by the unit tests)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

FAKE = Path(__file__).with_name("fake_droid.py")
ARGS = ["exec", "--input-format", "stream-jsonrpc", "--output-format", "stream-jsonrpc"]

# Verbatim lines of the real droid 0.225.2 (rpc_multiturn_one_process / rpc_probe_minimal_envelope).
REAL_MCP_LINE = (
    '{"jsonrpc":"2.0","type":"notification","factoryApiVersion":"1.0.0","factoryProtocolVersion":"1.220.0",'
    '"method":"droid.session_notification","params":{"notification":{"type":"mcp_status_changed",'
    '"servers":[],"summary":{"total":0,"connected":0,"connecting":0,"failed":0,"disabled":0}}}}'
)
REAL_BAD_ENVELOPE_LINE = (
    '{"jsonrpc":"2.0","type":"response","factoryApiVersion":"1.0.0","factoryProtocolVersion":"1.220.0",'
    '"id":null,"error":{"code":-32700,"message":"Invalid JSON-RPC message"}}'
)
NOTIFICATION_KEYS = ["jsonrpc", "type", "factoryApiVersion", "factoryProtocolVersion", "method", "params"]
RESPONSE_KEYS = ["jsonrpc", "type", "factoryApiVersion", "factoryProtocolVersion", "id", "result"]

TIMEOUT = 5.0


class Droid:
    """One fake droid process; every wait has a deadline."""

    def __init__(self, home: Path, cwd: Path, env: dict[str, str] | None = None) -> None:
        full_env = dict(os.environ)
        full_env.pop("FAKE_DROID_STATE", None)
        full_env["HOME"] = str(home)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKE), *ARGS],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=str(cwd),
            env=full_env,
        )
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        self.stderr = b""
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def send_raw(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def send(self, obj: dict[str, Any]) -> None:
        self.send_raw(json.dumps(obj))

    def request(self, method: str, params: dict[str, Any] | None = None) -> str:
        rid = str(uuid.uuid4())
        self.send(
            {
                "jsonrpc": "2.0",
                "factoryApiVersion": "1.0.0",
                "type": "request",
                "id": rid,
                "method": method,
                "params": params or {},
            }
        )
        return rid

    def next_raw(self, timeout: float = TIMEOUT) -> bytes | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout}s") from None

    def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = TIMEOUT
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Messages up to and including the first one matching pred."""
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timeout; seen: {[note_type(m) for m in seen]}")
            raw = self.next_raw(left)
            if raw is None:
                raise AssertionError(f"stdout closed; seen: {[note_type(m) for m in seen]}")
            msg = json.loads(raw)
            seen.append(msg)
            if pred(msg):
                return msg, seen

    def response(self, rid: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        msg, _ = self.wait_for(lambda m: m.get("type") == "response" and m.get("id") == rid, timeout)
        return msg

    def ready(self) -> None:
        raw = self.next_raw()
        assert raw is not None and raw.decode().rstrip("\n") == REAL_MCP_LINE

    def initialize(self, cwd: Path, **extra: Any) -> str:
        rid = self.request("droid.initialize_session", {"machineId": "m1", "cwd": str(cwd), **extra})
        resp = self.response(rid)
        return str(resp["result"]["sessionId"])

    def turn(self, text: str, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        """Send a message; return the notifications of the turn up to the final idle."""
        rid = self.request("droid.add_user_message", {"text": text})
        resp = self.response(rid)
        assert resp["result"] == {}
        _, seen = self.wait_for(lambda m: note_type(m) == "agent_turn_completed", timeout)
        idle, _ = self.wait_for(lambda m: note_type(m) == "droid_working_state_changed", timeout)
        assert idle["params"]["notification"]["newState"] == "idle"
        return seen

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)


def note_type(msg: dict[str, Any]) -> str | None:
    if msg.get("type") != "notification":
        return f"<{msg.get('type')}>"
    return msg["params"]["notification"]["type"]


def notes(seen: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m["params"]["notification"] for m in seen if note_type(m) == kind]


def answer_text(seen: list[dict[str, Any]]) -> str:
    return "".join(n["textDelta"] for n in notes(seen, "assistant_text_delta"))


@pytest.fixture
def spawn(tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    procs: list[Droid] = []

    def _spawn(env: dict[str, str] | None = None) -> Droid:
        d = Droid(home, work, env)
        procs.append(d)
        return d

    _spawn.home = home  # type: ignore[attr-defined]
    _spawn.work = work  # type: ignore[attr-defined]
    yield _spawn
    for d in procs:
        d.kill()


def test_version() -> None:
    out = subprocess.run(
        [sys.executable, str(FAKE), "--version"], capture_output=True, timeout=TIMEOUT, check=True
    )
    assert out.stdout == b"0.225.2\n"


def test_envelope_errors(spawn) -> None:
    d = spawn()
    d.ready()
    d.send({"jsonrpc": "2.0", "id": "x", "method": "droid.list_models", "params": {}})
    assert d.next_raw().decode().rstrip("\n") == REAL_BAD_ENVELOPE_LINE
    d.send({"jsonrpc": "2.0", "type": "request", "id": "y", "method": "droid.list_models"})
    assert json.loads(d.next_raw())["error"]["message"] == "Invalid JSON-RPC message"
    d.send_raw("this is not json")
    bad = json.loads(d.next_raw())
    assert bad["id"] is None and bad["error"] == {"code": -32700, "message": "Invalid JSON"}
    rid = d.request("droid.no_such_method")
    assert d.response(rid)["error"]["code"] == -32601
    rid = d.request("droid.add_user_message", {"text": "too early"})
    assert d.response(rid)["error"] == {
        "code": -32603,
        "message": "No active session. Call initialize_session or load_session first.",
    }
    # stdin EOF while idle: idle notification, exit 0 quickly
    d.close_stdin()
    t0 = time.monotonic()
    assert d.wait_exit() == 0
    assert time.monotonic() - t0 < 1.0


def test_turns_and_wire_shape(spawn, tmp_path: Path) -> None:
    log = tmp_path / "methods.log"
    d = spawn({"FAKE_DROID_LOG": str(log)})
    d.ready()
    rid = d.request("droid.initialize_session", {"machineId": "m1", "cwd": str(spawn.work)})
    resp, seen = d.wait_for(lambda m: m.get("id") == rid)
    assert [note_type(m) for m in seen] == ["settings_updated", "<response>"]
    assert list(resp) == RESPONSE_KEYS
    sid = resp["result"]["sessionId"]
    assert resp["result"]["session"] == {"messages": []}
    assert resp["result"]["settings"]["modelId"] == "custom:fake-model"

    seen = d.turn("hello there, first question")
    kinds = [note_type(m) for m in seen]
    assert kinds[0] == "droid_working_state_changed"
    assert kinds.count("assistant_text_delta") == 4
    assert kinds.index("create_message") < kinds.index("assistant_text_delta")
    for m in seen:
        if m["type"] == "notification":
            assert list(m) == NOTIFICATION_KEYS
            assert m["method"] == "droid.session_notification"
    ctx, user, assistant = notes(seen, "create_message")
    assert ctx["message"]["visibility"] == "llm_only"
    assert user["requestId"] and user["message"]["content"][0]["text"] == "hello there, first question"
    text = answer_text(seen)
    assert assistant["message"]["content"][0]["text"] == text
    assert text.endswith(" [system=none] [turns=1]")
    done = notes(seen, "agent_turn_completed")[0]
    assert done["reason"] == "completed" and done["turnId"] == user["message"]["id"]
    assert set(done["tokenUsage"]) == {
        "inputTokens", "outputTokens", "cacheCreationTokens", "cacheReadTokens",
        "thinkingTokens", "factoryCredits",
    }
    assert all(m["params"].get("sessionId") == sid for m in seen if note_type(m) == "assistant_text_delta")

    seen = d.turn("second question [[usage:7,3]]")
    assert answer_text(seen).endswith("[turns=2]")
    assert not notes(seen, "create_message")[0]["message"].get("visibility")  # no 2nd context msg
    assert notes(seen, "agent_turn_completed")[0]["tokenUsage"]["inputTokens"] == 7

    d.close_stdin()
    assert d.wait_exit() == 0
    assert log.read_text().split() == [
        "droid.initialize_session",
        "droid.add_user_message",
        "droid.add_user_message",
    ]


def test_load_session_in_other_process(spawn) -> None:
    a = spawn()
    a.ready()
    sid = a.initialize(spawn.work, systemPrompt="You are a plain chat model.")
    a.turn("my name is Alice")
    a.close_stdin()
    assert a.wait_exit() == 0

    b = spawn()
    b.ready()
    rid = b.request("droid.load_session", {"sessionId": str(uuid.uuid4())})
    assert b.response(rid)["error"] == {"code": -32004, "message": "Session not found"}
    rid = b.request("droid.load_session", {"sessionId": sid})
    result = b.response(rid)["result"]
    roles = [m["role"] for m in result["session"]["messages"]]
    assert roles == ["user", "user", "assistant"]
    assert result["cwd"] == str(spawn.work)
    seen = b.turn("what is my name?")
    assert answer_text(seen).endswith(" [system=You are a plain chat] [turns=2]")


def test_interrupt_hang(spawn) -> None:
    d = spawn()
    d.ready()
    d.initialize(spawn.work)
    rid = d.request("droid.add_user_message", {"text": "stall [[hang]]"})
    d.response(rid)
    d.wait_for(lambda m: note_type(m) == "droid_working_state_changed"
               and m["params"]["notification"]["newState"] == "thinking")
    t0 = time.monotonic()
    d.request("droid.interrupt_session")
    done, seen = d.wait_for(lambda m: note_type(m) == "agent_turn_completed")
    assert time.monotonic() - t0 < 0.5
    assert done["params"]["notification"]["reason"] == "cancelled"
    assert not notes(seen, "assistant_text_delta")
    d.wait_for(lambda m: note_type(m) == "droid_working_state_changed")
    seen = d.turn("after interrupt")
    assert answer_text(seen).endswith("[turns=2]")


def test_permission_and_retraction(spawn) -> None:
    d = spawn()
    d.ready()
    d.initialize(spawn.work)
    rid = d.request("droid.add_user_message", {"text": "create a file [[permission]]"})
    d.response(rid)
    req, _ = d.wait_for(lambda m: m.get("method") == "droid.request_permission")
    assert list(req)[:3] == ["type", "jsonrpc", "factoryApiVersion"]
    assert [o["value"] for o in req["params"]["options"]] == ["proceed_once", "proceed_always", "cancel"]
    d.send({"jsonrpc": "2.0", "factoryApiVersion": "1.0.0", "type": "response", "id": req["id"],
            "result": {"selectedOption": "proceed_once"}})
    _, seen = d.wait_for(lambda m: note_type(m) == "agent_turn_completed")
    assert notes(seen, "tool_result")[0]["isError"] is False
    assert "[permission=proceed_once]" in answer_text(seen)
    d.wait_for(lambda m: note_type(m) == "droid_working_state_changed")

    seen = d.turn("flaky upstream [[error:500]]")
    retracted = notes(seen, "assistant_message_retracted")
    retries = notes(seen, "llm_retry")
    assert len(retracted) == 2 and [r["attempt"] for r in retries] == [1, 2]
    deltas = notes(seen, "assistant_text_delta")
    msg_id = retracted[0]["messageId"]
    assert all(x["messageId"] == msg_id for x in deltas)
    # what counts is the text after the last retraction
    last = max(i for i, m in enumerate(seen) if note_type(m) == "assistant_message_retracted")
    final = answer_text(seen[last + 1:])
    assert "retracted" not in final and final.endswith("[turns=2]")
    assert notes(seen, "create_message")[-1]["message"]["content"][0]["text"] == final


def test_crash_and_stdin_eof_mid_turn(spawn) -> None:
    d = spawn()
    d.ready()
    d.initialize(spawn.work)
    d.request("droid.add_user_message", {"text": "boom [[crash]]"})
    assert d.wait_exit() == 1
    t0 = time.monotonic()
    while not d.stderr and time.monotonic() - t0 < TIMEOUT:
        time.sleep(0.01)
    assert b"crash" in d.stderr

    e = spawn()
    e.ready()
    e.initialize(spawn.work)
    rid = e.request("droid.add_user_message", {"text": "answer slowly [[slow:30]]"})
    e.response(rid)
    e.wait_for(lambda m: note_type(m) == "assistant_text_delta")
    e.close_stdin()
    done, seen = e.wait_for(lambda m: note_type(m) == "agent_turn_completed")
    assert done["params"]["notification"]["reason"] == "process_exit"
    assert len(notes(seen, "assistant_text_delta")) == 5  # the turn finished (6 deltas in all)
    assert e.wait_exit() == 0
