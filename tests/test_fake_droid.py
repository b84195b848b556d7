"""Quick checks of tests/fake_droid.py itself (the fake `droid` used by the unit tests)."""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


# --- attachments and structured output, against droid 0.225.2's recordings ----------------------
# (tests/fixtures/rpc_attach_*.stdout.jsonl, rpc_structured_*.stdout.jsonl; their .llm.json
# companions hold what the recorded fake LLM received)

FIXTURES = Path(__file__).with_name("fixtures")
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "temp": {"type": "number"}},
          "required": ["city", "temp"], "additionalProperties": False}
VISION = "custom:fake-vision"


def png(width: int = 16, height: int = 16, rgb: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image(data: bytes, media_type: str = "image/png") -> dict[str, str]:
    return {"type": "base64", "mediaType": media_type, "data": b64(data)}


def recorded(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (FIXTURES / f"{name}.stdout.jsonl").read_text().splitlines()]


def turn_of(messages: list[dict[str, Any]], rid: str) -> list[dict[str, Any]]:
    """One turn: from the add_user_message response to the idle after agent_turn_completed (or,
    for a turn droid failed on its attachments, to the second response to the same request)."""
    start = next(i for i, m in enumerate(messages) if m.get("type") == "response" and m.get("id") == rid)
    out: list[dict[str, Any]] = []
    done = False
    for m in messages[start:]:
        out.append(m)
        if m.get("type") == "response" and m.get("id") == rid and "error" in m:
            break
        done = done or note_type(m) == "agent_turn_completed"
        if done and note_type(m) == "droid_working_state_changed" and m["params"]["notification"]["newState"] == "idle":
            break
    return out


def shape(messages: list[dict[str, Any]]) -> list[str]:
    """What must match between droid and the fake: the order of message kinds, the keys of each
    notification and whether it names the session, the roles/visibility/block types of created
    messages. Text, ids, counts of deltas and token usage updates may differ."""
    out: list[str] = []
    for m in messages:
        kind = note_type(m) or ""
        if kind == "session_token_usage_changed":
            continue
        if m.get("type") == "response":
            kind = "<response error>" if "error" in m else "<response>"
        elif kind == "create_message":
            msg = m["params"]["notification"]["message"]
            kind += f":{msg['role']}:{msg.get('visibility')}:" + ",".join(b["type"] for b in msg["content"])
        elif kind == "droid_working_state_changed":
            kind += ":" + m["params"]["notification"]["newState"]
        else:
            kind += ":" + ",".join(sorted(m["params"]["notification"]))
        if m.get("type") == "notification" and "sessionId" not in m["params"]:
            kind += " (no sessionId)"
        if not out or out[-1] != kind:
            out.append(kind)
    return out


def send_turn(d: Droid, params: dict[str, Any], rid: str | None = None) -> list[dict[str, Any]]:
    rid = rid or str(uuid.uuid4())
    d.send({"jsonrpc": "2.0", "factoryApiVersion": "1.0.0", "type": "request", "id": rid,
            "method": "droid.add_user_message", "params": params})
    _, seen = d.wait_for(lambda m: m.get("type") == "response" and m.get("id") == rid)
    if "error" in seen[-1]:
        return seen[-1:]
    seen = seen[-1:]
    done = False
    while True:
        m, more = d.wait_for(lambda m: True)
        seen += more
        if m.get("type") == "response" and m.get("id") == rid:
            return seen
        done = done or note_type(m) == "agent_turn_completed"
        if done and note_type(m) == "droid_working_state_changed" and m["params"]["notification"]["newState"] == "idle":
            return seen


def started(spawn, model: str = VISION, env: dict[str, str] | None = None, **init: Any) -> Droid:
    d = spawn(env)
    d.ready()
    d.initialize(spawn.work, modelId=model, **init)
    # as droidpool does (and the recordings): a title set first stops droid's title request
    assert d.response(d.request("droid.rename_session", {"title": "droidpool"}))["result"] == {"success": True}
    return d


def test_attachment_requests_are_refused_like_droid(spawn) -> None:
    recorded_errors = {m["id"]: m["error"] for m in recorded("rpc_attach_refused")
                       if m.get("type") == "response" and "error" in m}
    d = started(spawn)
    requests = {
        "m1": {"text": "bmp", "images": [image(b"BM....", "image/bmp")]},
        "m2": {"text": "svg", "images": [image(b"<svg/>", "image/svg+xml")]},
        "m3": {"text": "octet", "images": [image(png(), "application/octet-stream")]},
        "m4": {"text": "url", "images": [{"type": "url", "url": "http://127.0.0.1:9/x.png"}]},
        "m5": {"text": "markdown", "files": [{"type": "text", "mediaType": "text/markdown", "data": "# x", "name": "x.md"}]},
        "m6": {"text": "docx", "files": [{"type": "base64", "mediaType": "application/msword", "data": "eHg=", "name": "x.doc"}]},
        "m7": {"text": "format text", "outputFormat": {"type": "text"}},
        "m8": {"text": "format no schema", "outputFormat": {"type": "json_schema"}},
    }
    assert set(requests) == set(recorded_errors)
    for rid, params in requests.items():
        assert send_turn(d, params, rid)[-1]["error"] == recorded_errors[rid], rid
    assert answer_text(send_turn(d, {"text": "plain after the refusals"})).endswith("[turns=1]")


def test_images_turn_like_droid(spawn) -> None:
    real = recorded("rpc_attach_images")
    d = started(spawn)
    one = send_turn(d, {"text": "describe this picture", "images": [image(png())]})
    assert shape(one) == shape(turn_of(real, "m1"))
    user = notes(one, "create_message")[-2]["message"]
    assert user["content"][0] == {"type": "image", "source": {"type": "base64", "data": b64(png()),
                                                              "mediaType": "image/png"}}
    assert answer_text(one).endswith(" [images=1] [system=none] [turns=1]")
    folders = list((spawn.home / ".factory" / "temp" / "images").iterdir())
    assert len(folders) == 1 and len(folders[0].name) == 8
    assert [p.suffix for p in folders[0].iterdir()] == [".png"]
    assert shape(send_turn(d, {"text": "and what colour was it?"})) == shape(turn_of(real, "m2"))
    two = send_turn(d, {"text": "compare these two", "images": [image(png()), image(png(rgb=(1, 2, 3)))]})
    assert shape(two) == shape(turn_of(real, "m3"))
    assert len(list(folders[0].iterdir())) == 3
    d.close_stdin()
    assert d.wait_exit() == 0
    assert not folders[0].exists()  # droid removes its images when it exits


def test_image_for_a_model_without_image_support(spawn) -> None:
    real = recorded("rpc_attach_noimage")
    d = started(spawn, "custom:fake-noimage", {"FAKE_DROID_MODELS": "custom:fake-vision,custom:fake-noimage"})
    seen = send_turn(d, {"text": "describe this picture", "images": [image(png())]})
    assert shape(seen) == shape(turn_of(real, "m1"))
    assert " [images=1 not shown] " in answer_text(seen)
    rid = d.request("droid.list_models")
    models = {m["id"]: m["noImageSupport"] for m in d.response(rid)["result"]["models"]}
    assert models["custom:fake-vision"] is False and models["custom:fake-noimage"] is True


@pytest.mark.parametrize("name, bad", [
    ("rpc_attach_bad_truncated", image(png()[:60])),
    ("rpc_attach_bad_base64", {"type": "base64", "mediaType": "image/png", "data": "this is not base64!!"}),
    ("rpc_attach_bad_gif", image(b"GIF89a\x10\x00\x10\x00", "image/gif")),
    ("rpc_attach_bad_mismatch", image(b"\xff\xd8\xff\xe0\x00\x10JFIF", "image/png")),
])
def test_bad_images_fail_like_droid(spawn, name: str, bad: dict[str, str]) -> None:
    real = recorded(name)
    d = started(spawn)
    assert shape(send_turn(d, {"text": "hello"})) == shape(turn_of(real, "m1"))
    seen = send_turn(d, {"text": "look", "images": [bad]})
    assert shape(seen) == shape(turn_of(real, "m2"))
    assert seen[-1]["error"] == turn_of(real, "m2")[-1]["error"]
    done = notes(seen, "agent_turn_completed")[0]
    assert done["reason"] == "error" and done["cumulativeTokenUsage"]["inputTokens"] > 0
    seen = send_turn(d, {"text": "still alive?"})
    assert shape(seen) == shape(turn_of(real, "m3"))
    assert answer_text(seen).endswith("[turns=2]")  # the failed message is not in the history
    assert not list((spawn.home / ".factory" / "temp" / "images").glob("*/*"))


def test_image_error_directive(spawn) -> None:
    d = started(spawn)
    seen = send_turn(d, {"text": "too big [[image_error]]", "images": [image(png())]})
    assert seen[-1]["error"] == {"code": -32603, "message": "Unable to compress image below provider size limit"}


def test_media_limit_reminder(spawn) -> None:
    real = recorded("rpc_attach_media_limit")
    d = started(spawn)
    seen = send_turn(d, {"text": "ten pictures", "images": [image(png(8, 8, (i, 9, 9))) for i in range(10)]})
    assert shape(seen) == shape(turn_of(real, "m1"))
    reminder = notes(seen, "create_message")[2]["message"]
    assert reminder["id"].startswith("__internal__system-reminder__")
    assert shape(send_turn(d, {"text": "one more", "images": [image(png(8, 8))]})) == shape(turn_of(real, "m2"))


def test_documents_like_droid(spawn) -> None:
    pdf_data = b"%PDF-1.4\n1 0 obj\n<< >>\nendobj\ntrailer\n<< >>\n%%EOF\n"
    d = started(spawn)
    seen = send_turn(d, {"text": "what is the secret word?", "files": [
        {"type": "base64", "mediaType": "application/pdf", "data": b64(pdf_data), "name": "doc.pdf"}]})
    real = recorded("rpc_attach_pdf")
    assert shape(seen) == shape(turn_of(real, "m1"))
    source = notes(seen, "create_message")[-2]["message"]["content"][0]["source"]
    real_source = notes(turn_of(real, "m1"), "create_message")[-2]["message"]["content"][0]["source"]
    assert list(source) == list(real_source)
    assert Path(source["path"]).read_bytes() == pdf_data
    assert Path(source["path"]).parent.parent.name == d_session(seen)
    assert answer_text(seen).endswith(" [files=doc.pdf] [system=none] [turns=1]")

    real = recorded("rpc_attach_text_files")
    texts = [{"type": "text", "mediaType": "text/plain", "data": "alpha line\nbeta line\n", "name": "a.txt"},
             {"type": "text", "mediaType": "text/plain", "mime": "text/markdown", "data": "# Title\n\n- item", "name": "notes.md"},
             {"type": "text", "mediaType": "text/plain", "mime": "text/csv", "data": "a,b\n1,2\n"}]
    seen = send_turn(d, {"text": "read these", "files": texts})
    assert created_user(seen) == created_user(turn_of(real, "m1"))
    assert answer_text(seen).endswith(" [files=a.txt,notes.md,unknown] [system=none] [turns=2]")
    seen = send_turn(d, {"text": "all at once", "images": [image(png())], "files": [
        {"type": "base64", "mediaType": "application/pdf", "data": b64(pdf_data), "name": "doc.pdf"},
        {"type": "text", "mediaType": "text/plain", "data": "gamma", "name": "g.txt"}]})
    assert [b["type"] for b in created_user(seen)] == [b["type"] for b in created_user(turn_of(real, "m2"))]


def d_session(seen: list[dict[str, Any]]) -> str:
    return next(m["params"]["sessionId"] for m in seen if m.get("params", {}).get("sessionId"))


def created_user(seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The user message's content blocks, with data cut (the recording's PDF is another one)."""
    user = next(n["message"] for n in notes(seen, "create_message")
                if n["message"]["role"] == "user" and n["message"]["content"])
    return [dict(b, source={k: v for k, v in b["source"].items() if k not in ("data", "path")}) if "source" in b else b
            for b in user["content"]]


class ToolServer:
    """An MCP server (streamable HTTP, JSON answers) with one tool whose result holds an image."""

    def __init__(self) -> None:
        result = {"content": [{"type": "image", "data": b64(png(16, 16, (10, 200, 10))), "mimeType": "image/png"},
                              {"type": "text", "text": "chart for sales"}], "isError": False}
        tools = [{"name": "get_chart", "description": "Returns a chart image.",
                  "inputSchema": {"type": "object", "properties": {"q": {"type": "string"}}}}]

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                method, mid = body.get("method"), body.get("id")
                answer = None
                if mid is not None:
                    answer = {"jsonrpc": "2.0", "id": mid, "result": {
                        "initialize": {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                                       "serverInfo": {"name": "t", "version": "1"}},
                        "tools/list": {"tools": tools}, "tools/call": result}.get(method, {})}
                data = json.dumps(answer).encode() if answer else b""
                self.send_response(200 if data else 202)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.param = {"type": "http", "name": "droidpool-github",
                      "url": f"http://127.0.0.1:{self.server.server_address[1]}/mcp", "headers": []}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("name, model", [("rpc_attach_tool_image", "custom:fake-vision-tools"),
                                         ("rpc_attach_tool_image_noimage", "custom:fake-tools")])
def test_image_in_a_tool_result(spawn, name: str, model: str) -> None:
    real = turn_of(recorded(name), "m1")
    server = ToolServer()
    try:
        d = started(spawn, model, mcpServers=[server.param])
        rid = str(uuid.uuid4())
        d.send({"jsonrpc": "2.0", "factoryApiVersion": "1.0.0", "type": "request", "id": rid,
                "method": "droid.add_user_message", "params": {"text": 'chart please [[call:get_chart:{"q":"sales"}]]'}})
        ask, _ = d.wait_for(lambda m: m.get("method") == "droid.request_permission")
        d.send({"jsonrpc": "2.0", "factoryApiVersion": "1.0.0", "type": "response", "id": ask["id"],
                "result": {"selectedOption": "proceed_once"}})
        _, seen = d.wait_for(lambda m: note_type(m) == "agent_turn_completed", timeout=15)
    finally:
        server.stop()
    got, want = notes(seen, "tool_result")[0], notes(real, "tool_result")[0]
    assert got["content"] == want["content"]  # a list of blocks, not a string
    assert answer_text(seen).split(" [system=")[0] == notes(real, "create_message")[-1]["message"]["content"][0]["text"]


STRUCTURED_CASES = {  # recording: what droidpool's test sends
    "rpc_structured_valid": "weather in Paris?",
    "rpc_structured_retry_once": 'weather? [[attempts:{"city": "Paris"}||{"city": "Paris", "temp": 21.5}]]',
    "rpc_structured_invalid": 'weather? [[attempts:Sorry, no JSON today.||{"city": 5, "temp": 1}||{"city": "Paris"}]]',
    "rpc_structured_object_only": "anything",
}


@pytest.mark.parametrize("name", list(STRUCTURED_CASES))
def test_structured_answer_like_droid(spawn, name: str) -> None:
    real = turn_of(recorded(name), "m1")
    schema = {"type": "object"} if name.endswith("object_only") else SCHEMA
    d = started(spawn, "custom:fake-json")
    seen = send_turn(d, {"text": STRUCTURED_CASES[name], "outputFormat": {"type": "json_schema", "schema": schema}})
    assert shape(seen) == shape(real)
    # one messageId per attempt, never retracted; only the accepted answer gets a create_message
    assert len({n["messageId"] for n in notes(seen, "assistant_text_delta")}) \
        == len({n["messageId"] for n in notes(real, "assistant_text_delta")})
    assert notes(seen, "create_message")[-1]["message"]["content"] == notes(real, "create_message")[-1]["message"]["content"]
    assert [n["structuredOutput"] for n in notes(seen, "structured_output")] \
        == [n["structuredOutput"] for n in notes(real, "structured_output")]
    assert [n["error"] for n in notes(seen, "error")] == [n["error"] for n in notes(real, "error")]
    assert notes(seen, "agent_turn_completed")[0]["reason"] == notes(real, "agent_turn_completed")[0]["reason"]
    if name == "rpc_structured_retry_once":  # the next turn goes on as usual
        assert shape(send_turn(d, {"text": "and tomorrow?"})) == shape(turn_of(recorded(name), "m2"))


def test_structured_schema_invalid_like_droid(spawn) -> None:
    real = recorded("rpc_structured_schema_invalid")
    d = started(spawn, "custom:fake-json")
    seen = send_turn(d, {"text": "anything", "outputFormat": {"type": "json_schema", "schema": {"type": "nonsense"}}})
    assert shape(seen) == shape(turn_of(real, "m1"))
    assert notes(seen, "error")[0]["error"] == notes(turn_of(real, "m1"), "error")[0]["error"]
    assert shape(send_turn(d, {"text": "plain after a bad schema"})) == shape(turn_of(real, "m2"))


def test_structured_validation_texts_match_droid() -> None:
    """droid's retry messages (what the recorded LLM received) name the error of each rejected
    answer; the fake's validator gives the same texts."""
    sys.path.insert(0, str(FAKE.parent))
    from fake_droid import structured_problem

    pattern = re.compile(r"Validation error: (.*)\nPrevious final response:\n(.*)\nRetry now", re.DOTALL)
    checked = 0
    for path in sorted(FIXTURES.glob("rpc_structured_*.llm.json")):
        for request in json.loads(path.read_text())["requests"]:
            for message in request["messages"]:
                found = pattern.search(message["content"]) if message["role"] == "system" else None
                if found:
                    assert structured_problem(found[2], SCHEMA)[1] == found[1]
                    checked += 1
    assert checked >= 4
    assert structured_problem('{"city": 5}', SCHEMA)[1] == "/ must have required property 'temp'; /city must be string"
    assert structured_problem('["a"]', SCHEMA)[1] == "Structured output must be a JSON object."
    assert structured_problem("```json\n{}\n```", SCHEMA)[1] == \
        "Final response must be valid JSON: JSON Parse error: Unrecognized token '`'"


def test_fail_directive(spawn) -> None:
    d = started(spawn)
    seen = send_turn(d, {"text": "no more credit [[fail:model_usage_exhausted]]"})
    assert notes(seen, "error")[0]["message"] == "Simulated failure (model_usage_exhausted)"
    system = notes(seen, "create_message")[-1]["message"]
    assert system["role"] == "system" and system["visibility"] == "user_only"
    assert system["content"][0]["text"].startswith("BYOK Error: Simulated failure (model_usage_exhausted)")
    assert notes(seen, "agent_turn_completed")[0]["reason"] == "model_usage_exhausted"
    seen = send_turn(d, {"text": "[[fail:prompt_rejected:Prompt rejected by the provider]]"})
    assert notes(seen, "error")[0]["message"] == "Prompt rejected by the provider"
    assert notes(seen, "agent_turn_completed")[0]["reason"] == "prompt_rejected"


def test_fake_llm_replays_the_recorded_answers() -> None:
    """tests/fakellm.py's json scenario and tool results, on the requests droid sent it."""
    from tests.fakellm import _structured_answer, _tool_results

    requests = json.loads((FIXTURES / "rpc_structured_invalid.llm.json").read_text())["requests"]
    answers = [_structured_answer(r["messages"]) for r in requests[:3]]
    assert answers == ["Sorry, no JSON today.", '{"city": 5, "temp": 1}', '{"city": "Paris"}']
    assert [m["content"] for m in requests[3]["messages"] if m["role"] == "assistant"] == answers
    requests = json.loads((FIXTURES / "rpc_structured_valid.llm.json").read_text())["requests"]
    assert _structured_answer(requests[0]["messages"]) == '{"city":"sample","temp":1.5}'  # built from the schema
    for name, seen in (("rpc_attach_tool_image", "chart for sales [+1 image(s)]"),
                       ("rpc_attach_tool_image_noimage", IMAGE_NOT_SHOWN_TEXT + "\nchart for sales")):
        requests = json.loads((FIXTURES / f"{name}.llm.json").read_text())["requests"]
        assert _tool_results(requests[1]["messages"]) == [seen]


IMAGE_NOT_SHOWN_TEXT = "[Image not shown: this model does not support image inputs]"
