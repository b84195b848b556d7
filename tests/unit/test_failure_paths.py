"""Failure paths on the real ``droidpool serve`` process (the fake droid as ``droid.binary``):
clients that hang up mid-stream or while queued, malformed HTTP, tool calls that never reach
their client, more parked agents than workers, ``/v1/models`` during start-up. (How droid's
session file is cut back after a crash: tests/unit/test_droid_files.py and, with the real droid,
tests/e2e/test_crash_real_droid.py.)

These are integration tests (each starts its own daemon with ``tests.conftest.start_daemon``);
they live here under this name until a later refactor moves them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import socket
import sqlite3
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    FAKE_DROID,
    Daemon,
    descendants,
    free_port,
    start_daemon,
    wait_until,
    write_config,
)

MODEL = "custom:fake-model"
WEATHER: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


# --- helpers -------------------------------------------------------------------------------------


def sections(tmp: Path, pool: dict[str, Any] | None = None, droid_env: dict[str, str] | None = None,
             **more: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (tmp / "home").mkdir(exist_ok=True)
    droid: dict[str, Any] = {"binary": str(FAKE_DROID), "home": str(tmp / "home")}
    if droid_env:
        droid["env"] = droid_env
    return {
        "droid": droid,
        "pool": {"max_workers": 3, "models": [{"id": MODEL}], "idle_min": 1, **(pool or {})},
        "deadlines": {"interrupt_grace_s": 2.0},
        **more,
    }


def records(daemon: Daemon) -> list[dict[str, Any]]:
    """The daemon's JSON log lines (stdout and stderr share the file)."""
    out = []
    for line in daemon.log().splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def events(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    return [r for r in records(daemon) if r.get("event") == name]


def assert_quiet(daemon: Daemon) -> None:
    """No error-level line and no traceback anywhere in the daemon's output."""
    text = daemon.log()
    errors = [line for line in text.splitlines() if '"level": "error"' in line or '"level": "critical"' in line]
    assert not errors, "\n".join(errors[:20])
    assert "Traceback" not in text, text[text.index("Traceback") - 2000:][:6000]


def readyz(daemon: Daemon) -> dict[str, Any]:
    body: dict[str, Any] = daemon.get("/readyz")[1]
    return body


def settled(daemon: Daemon) -> bool:
    """Nothing busy, queued or parked."""
    body = readyz(daemon)
    return bool(body["workers"]["busy"] == 0 and body["workers"]["queued"] == 0
                and body["client_tools"]["parked"] == 0)


def assert_no_extra_processes(daemon: Daemon, max_workers: int) -> None:
    """Every process below the daemon is one of its live workers (no orphan, no leftover)."""
    def matches() -> bool:
        workers = readyz(daemon)["workers"]
        alive = sum(workers[s] for s in ("starting", "ready", "busy", "idle", "stopping"))
        return bool(len(descendants(daemon.process.pid)) == alive <= max_workers)

    wait_until(matches, 15, "the daemon's processes to be exactly its live workers")
    for pid in descendants(daemon.process.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert b"fake_droid.py" in cmdline, cmdline


def post(daemon: Daemon, path: str, body: Any, headers: dict[str, str] | None = None,
         timeout: float = 30) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(daemon.base_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.load(exc)


def chat(daemon: Daemon, text: str, headers: dict[str, str] | None = None, timeout: float = 30,
         **extra: Any) -> tuple[int, dict[str, str], Any]:
    return post(daemon, "/v1/chat/completions",
                {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}, headers, timeout)


def send_raw(port: int, path: str, body: Any, headers: dict[str, str] | None = None,
             timeout: float = 20) -> socket.socket:
    """A request on a socket of our own: the test decides when and how the client goes."""
    data = json.dumps(body).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{head}"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def read_until(sock: socket.socket, marker: bytes, timeout: float = 20) -> bytes:
    """Read until ``marker`` has arrived (an AssertionError after ``timeout`` or at EOF)."""
    deadline = time.monotonic() + timeout
    data = b""
    while marker not in data:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} within {timeout} s: {data[:1500]!r}"
        sock.settimeout(left)
        chunk = sock.recv(65536)
        assert chunk, f"EOF before {marker!r}: {data[:1500]!r}"
        data += chunk
    return data


def header(data: bytes, name: str) -> str:
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    raise AssertionError(f"no {name} header in {head!r}")


def hang_up(sock: socket.socket, reset: bool) -> None:
    """Close: a FIN, or (``reset``) an RST, as a killed client's kernel sends."""
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# One streamed request per dialect, and the bytes of its first text delta.
STREAMS: dict[str, tuple[str, Any, bytes]] = {
    "openai": ("/v1/chat/completions", lambda text: {"model": MODEL, "stream": True,
                                                     "messages": [{"role": "user", "content": text}]},
               b'"delta":{"content":"'),
    "anthropic": ("/v1/messages", lambda text: {"model": MODEL, "max_tokens": 64, "stream": True,
                                                "messages": [{"role": "user", "content": text}]},
                  b'"text_delta"'),
    "responses": ("/v1/responses", lambda text: {"model": MODEL, "stream": True, "input": text},
                  b"response.output_text.delta"),
}


@pytest.fixture
def cleanup() -> Iterator[list[Daemon]]:
    """Daemons stopped (SIGTERM, then SIGKILL past the deadline) whatever the test did."""
    daemons: list[Daemon] = []
    yield daemons
    for daemon in daemons:
        if daemon.process.poll() is None:
            try:
                daemon.stop()
            except AssertionError:
                pass


# --- 1. clients that hang up mid-stream ----------------------------------------------------------

DISCONNECTS_PER_DIALECT = 100


def test_mid_stream_disconnects_are_quiet_and_leave_nothing_behind(tmp_path: Path, cleanup: list[Daemon]) -> None:
    max_workers = 3
    daemon = start_daemon(tmp_path, sections(tmp_path, {"max_workers": max_workers, "queue_timeout_s": 60.0}))
    cleanup.append(daemon)
    jobs = [(dialect, i) for i in range(DISCONNECTS_PER_DIALECT) for dialect in STREAMS]

    def disconnect(job: tuple[str, int]) -> tuple[str, str]:
        dialect, index = job
        path, body, first_delta = STREAMS[dialect]
        # A new conversation each time, 6 deltas 50 ms apart: the stream is still running when
        # the client goes, right after the first text delta.
        sock = send_raw(daemon.port, path, body(f"disconnect {dialect} {index} [[slow:50]]"))
        try:
            data = read_until(sock, first_delta)
        finally:
            hang_up(sock, reset=index % 2 == 1)
        return dialect, header(data, "X-Session-Id")

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
        gone = list(pool.map(disconnect, jobs))
    sent_s = time.monotonic() - started
    assert len({session for _, session in gone}) == len(jobs)

    def logged() -> list[dict[str, Any]]:
        return [r for r in events(daemon, "turn") if r.get("status") == "client_disconnected"]

    wait_until(lambda: len(logged()) >= len(jobs) and settled(daemon), 60,
               "a turn line for every disconnect and an idle pool")
    turns = events(daemon, "turn")
    by_session: dict[str | None, list[dict[str, Any]]] = {}
    for line in turns:
        by_session.setdefault(line.get("session"), []).append(line)
    for dialect, session in gone:
        lines = by_session.get(session, [])
        assert len(lines) == 1, (session, lines)
        (line,) = lines
        assert (line["level"], line["status"], line["http_status"], line["dialect"], line["phase"], line["stream"]) \
            == ("info", "client_disconnected", 499, dialect, "turn", True), line
    assert len(turns) == len(jobs), [t for t in turns if t.get("session") not in {s for _, s in gone}]
    assert_quiet(daemon)
    body = readyz(daemon)
    assert body["ready"] and body["workers"]["busy"] == 0 and body["workers"]["queued"] == 0, body
    assert_no_extra_processes(daemon, max_workers)
    # Still serving.
    status, _, answer = chat(daemon, "still there?")
    assert status == 200 and answer["choices"][0]["message"]["content"].endswith("[turns=1]")
    print(f"\n{len(jobs)} mid-stream disconnects in {sent_s:.1f} s")


# --- 2. requests aiohttp cannot parse -------------------------------------------------------------

OPENAI_KEYS = {"message", "type", "param", "code"}


def raw_exchange(port: int, payload: bytes, timeout: float = 10) -> bytes:
    """Send ``payload`` as is; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        deadline = time.monotonic() + timeout
        data = b""
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no complete answer within {timeout} s: {data[:500]!r}"
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    return data


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return status, headers, body


def malformed(path: str) -> dict[str, bytes]:
    """Requests aiohttp's parser refuses before any handler runs, each naming ``path``."""
    p = path.encode()
    body = b'{"model": "custom:fake-model", "messages": [{"role": "user", "content": "hi"}]}'
    framing = b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
    return {
        "control character in a header value": b"POST " + p + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Note: a\x01b\r\n"
                                                 + framing + b"\r\n" + body,
        "non-UTF-8 byte in a header name": b"POST " + p + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nX-N\xffte: ab\r\n"
                                           + framing + b"\r\n" + body,
        "bad request line": b"POST " + p + b" HTTP/1.1 extra words\r\nHost: 127.0.0.1\r\n\r\n",
        "oversize header": b"POST " + p + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 9000 + b"\r\n"
                           + framing + b"\r\n" + body,
        "oversize request line": b"GET " + p + b"?q=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    }


def test_malformed_requests_get_an_envelope_and_one_warning(tmp_path: Path, cleanup: list[Daemon]) -> None:
    daemon = start_daemon(tmp_path, sections(tmp_path))
    cleanup.append(daemon)
    sent = 0
    for path in ("/v1/chat/completions", "/v1/messages", "/v1/responses"):
        for kind, payload in malformed(path).items():
            status, headers, body = parse_response(raw_exchange(daemon.port, payload))
            sent += 1
            where = f"{kind} on {path}: {status} {body[:300]!r}"
            assert 400 <= status < 500, where
            assert headers.get("content-type", "").startswith("application/json"), where
            document = json.loads(body)
            if path.startswith("/v1/messages"):
                assert document["type"] == "error" and set(document["error"]) == {"type", "message"}, where
                assert document["error"]["type"] in ("invalid_request_error", "request_too_large"), where
            else:
                assert set(document) == {"error"} and set(document["error"]) == OPENAI_KEYS, where
                assert document["error"]["code"] == "malformed_request", where
            assert document["error"]["message"].startswith("Malformed HTTP request"), where
            assert "Traceback" not in document["error"]["message"], where
    # The non-UTF-8 byte in a header *value* is legal HTTP (obs-text): served, not refused.
    for value in (b"\xff\xfe", b"caf\xe9"):
        payload = (b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Note: " + value + b"\r\nConnection: close\r\n\r\n")
        status, _, body = parse_response(raw_exchange(daemon.port, payload))
        assert status == 200 and json.loads(body)["data"], (value, status, body[:300])
    wait_until(lambda: len(events(daemon, "http.malformed_request")) >= sent, 5, "the warnings")
    time.sleep(0.3)  # none late
    warnings = events(daemon, "http.malformed_request")
    assert len(warnings) == sent, warnings
    assert all(w["level"] == "warning" and 400 <= w["status"] < 500 for w in warnings), warnings
    assert "Traceback" not in daemon.log()
    assert chat(daemon, "fine")[0] == 200  # the server is unharmed


def test_a_request_line_split_across_segments_still_gets_its_dialects_envelope(
        tmp_path: Path, cleanup: list[Daemon]) -> None:
    """The head of a request may come in several TCP segments (a slow link, a client that writes
    the method first): the envelope follows the path all the same."""
    daemon = start_daemon(tmp_path, sections(tmp_path))
    cleanup.append(daemon)
    payload = malformed("/v1/messages")["control character in a header value"]
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(payload[:8])  # b"POST /v1"
        time.sleep(0.2)  # the server has read it before the rest comes
        sock.sendall(payload[8:])
        sock.settimeout(10)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status, _, body = parse_response(data)
    assert status == 400
    assert json.loads(body).get("type") == "error", body  # Anthropic's envelope, as for the unsplit request


# --- 3. a client that gives up while queued behind a full pool --------------------------------------


def test_a_queued_request_whose_client_left_is_never_dispatched(tmp_path: Path, cleanup: list[Daemon]) -> None:
    droid_log = tmp_path / "fake-droid.log"
    daemon = start_daemon(tmp_path, sections(
        tmp_path, {"max_workers": 2, "idle_min": 1, "queue_timeout_s": 60.0},
        droid_env={"FAKE_DROID_LOG": str(droid_log)}))
    cleanup.append(daemon)

    def turns_begun() -> int:
        return droid_log.read_text().splitlines().count("droid.add_user_message") if droid_log.exists() else 0

    path, body, _ = STREAMS["openai"]
    hanging = [send_raw(daemon.port, path, body(f"hold {i} [[hang]]")) for i in range(2)]
    try:
        for sock in hanging:
            read_until(sock, b"\r\n\r\n")  # its turn began: a worker is leased
        wait_until(lambda: readyz(daemon)["workers"]["busy"] == 2, 10, "both workers busy")
        assert readyz(daemon)["max_workers"] == 2 and turns_begun() == 2
        # A client with a 1 s timeout: it waits in the queue, then goes.
        waiting = send_raw(daemon.port, "/v1/chat/completions",
                           {"model": MODEL, "messages": [{"role": "user", "content": "queued one"}]},
                           {"X-Conversation-Id": "queued-one"}, timeout=1.0)
        with pytest.raises(TimeoutError):
            waiting.recv(1)
        assert readyz(daemon)["workers"]["queued"] == 1
        waiting.close()
        wait_until(lambda: readyz(daemon)["workers"]["queued"] == 0, 5, "the queue to empty")
        wait_until(lambda: [t for t in events(daemon, "turn") if t.get("conversation") == "queued-one"], 5,
                   "the queued request's turn line")
    finally:
        for sock in hanging:
            hang_up(sock, reset=False)
    wait_until(lambda: settled(daemon), 15, "the hanging turns to be interrupted")
    time.sleep(0.5)  # a late dispatch would show now
    (line,) = [t for t in events(daemon, "turn") if t.get("conversation") == "queued-one"]
    assert (line["level"], line["status"], line["http_status"], line["phase"], line["session"]) \
        == ("info", "client_disconnected", 499, "admission", None), line
    assert turns_begun() == 2  # it never reached droid
    # Plain requests are served afterwards.
    for i in range(3):
        status, _, answer = chat(daemon, f"after {i}")
        assert status == 200 and answer["choices"][0]["finish_reason"] == "stop"
    assert turns_begun() == 5
    assert [t for t in events(daemon, "turn") if t.get("conversation") == "queued-one"] == [line]
    assert_quiet(daemon)


# --- 4. tool calls whose client went before they arrived ---------------------------------------------


def ask(city: str) -> str:
    return f"weather in {city}? [[call:get_weather:{{\"city\": \"{city}\"}}]]"


def tool_stream(text: str) -> dict[str, Any]:
    return {"model": MODEL, "stream": True, "tools": [WEATHER], "messages": [{"role": "user", "content": text}]}


ARGUMENTS = b'"arguments":"{'  # the call's arguments: droid asks for the results right after them


class StoreWriteLock:
    """The daemon's SQLite store held for writing by the test (``BEGIN IMMEDIATE`` on its file):
    the daemon's next write waits (its busy timeout is 5 s) until ``release``. This is how a test
    puts a client's disconnect exactly where a slow disk or a busy store would: while the daemon
    records a turn."""

    def __init__(self, daemon_tmp: Path) -> None:
        self.db: sqlite3.Connection | None = sqlite3.connect(
            daemon_tmp / "state" / "sessions.db", isolation_level=None, timeout=10)
        self.db.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        if self.db is not None:
            self.db.execute("ROLLBACK")
            self.db.close()
            self.db = None


def session_row(daemon_tmp: Path, session: str) -> dict[str, Any]:
    with contextlib.closing(sqlite3.connect(daemon_tmp / "state" / "sessions.db", timeout=10)) as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM sessions WHERE session_id = ?", (session,)).fetchone()
        turns = db.execute("SELECT status, input_tokens, output_tokens FROM turns WHERE session_id = ?",
                           (session,)).fetchall()
    assert row is not None, session
    return {**dict(row), "ledger": [tuple(t) for t in turns]}


def test_a_client_gone_as_its_tool_calls_arrive_leaves_no_park(tmp_path: Path, cleanup: list[Daemon]) -> None:
    """The client hangs up the moment the calls' arguments arrive (before the end of the stream):
    its turn holds no worker a moment later, whether droidpool had parked it yet (released:
    ``turn.park_undelivered``) or not (interrupted: ``turn.failed``)."""
    daemon = start_daemon(tmp_path, sections(tmp_path, {"max_workers": 2}, tools={"park_timeout_s": 300.0}))
    cleanup.append(daemon)
    cut_short: list[str] = []
    for attempt in range(4):
        sock = send_raw(daemon.port, "/v1/chat/completions", tool_stream(ask(f"Oslo {attempt}")))
        try:
            data = read_until(sock, ARGUMENTS)
        finally:
            hang_up(sock, reset=attempt % 2 == 1)
        session = header(data, "X-Session-Id")
        if b'"finish_reason":"tool_calls"' in data:
            # The whole stream came in the same read (a loaded machine): the client did get its
            # calls, and the park rightly stays. Not this test's case: let it go.
            with urllib.request.urlopen(urllib.request.Request(
                    f"{daemon.base_url}/v1/sessions/{session}", method="DELETE"), timeout=10):
                pass
        else:
            cut_short.append(session)
        started = time.monotonic()
        wait_until(lambda: settled(daemon), 3, "the turn to let its worker go (parked 0, no busy worker)")
        assert time.monotonic() - started < 2.5
    assert len(cut_short) >= 2, cut_short
    ended = {e["session"] for e in events(daemon, "turn.park_undelivered") + events(daemon, "turn.failed")}
    assert set(cut_short) <= ended, (cut_short, ended)
    assert not events(daemon, "turn.park_expired") and not events(daemon, "turn.park_yielded")
    turns = [t for t in events(daemon, "turn") if t["session"] in cut_short]
    assert [(t["status"], t["phase"]) for t in turns] == [("client_disconnected", "turn")] * len(cut_short), turns
    # A client that stays gets its calls and keeps its park.
    status, _, answer = post(daemon, "/v1/chat/completions", {**tool_stream(ask("Rome")), "stream": False})
    assert status == 200 and answer["choices"][0]["finish_reason"] == "tool_calls"
    assert readyz(daemon)["client_tools"]["parked"] == 1
    assert_quiet(daemon)


def test_a_park_whose_client_left_while_it_was_recorded_is_released_as_undelivered(
        tmp_path: Path, cleanup: list[Daemon]) -> None:
    """The client hangs up right after the calls arrive, while droidpool records the park (its store
    is slow): the calls' stream never ended, so the park is released at once (``turn.park_undelivered``)."""
    daemon = start_daemon(tmp_path, sections(tmp_path, {"max_workers": 2}, tools={"park_timeout_s": 300.0}))
    cleanup.append(daemon)
    sock = send_raw(daemon.port, "/v1/chat/completions", tool_stream(ask("Oslo") + " [[usage:100,10]]"))
    lock = None
    try:
        session = header(read_until(sock, b"\r\n\r\n"), "X-Session-Id")  # the session is in the store
        lock = StoreWriteLock(tmp_path)
        read_until(sock, ARGUMENTS)
        time.sleep(0.2)  # droidpool is recording the park now: it waits for the store
        hang_up(sock, reset=False)
        time.sleep(0.3)
    finally:
        if lock is not None:
            lock.release()
        sock.close()
    started = time.monotonic()
    wait_until(lambda: settled(daemon), 3, "the park to be released (parked 0, no busy worker)")
    assert time.monotonic() - started < 2.5
    wait_until(lambda: events(daemon, "turn"), 5, "the turn line")
    (line,) = events(daemon, "turn")
    assert (line["status"], line["phase"]) == ("client_disconnected", "turn"), line
    row = session_row(tmp_path, session)
    assert [e["session"] for e in events(daemon, "turn.park_undelivered")] == [session], \
        ([r for r in records(daemon) if str(r.get("event", "")).startswith("turn.")], row)
    assert not row["in_flight"], row
    assert_quiet(daemon)


def test_a_turn_whose_client_left_while_it_was_recorded_is_counted_once(
        tmp_path: Path, cleanup: list[Daemon]) -> None:
    """The client hangs up after the whole answer streamed, while droidpool records the turn (its
    store is slow): the turn is recorded once, as completed or as failed, and droid's usage is
    counted once."""
    daemon = start_daemon(tmp_path, sections(tmp_path, {"max_workers": 2}))
    cleanup.append(daemon)
    path, body, _ = STREAMS["openai"]
    sock = send_raw(daemon.port, path, body("count me once [[slow:100]] [[usage:100,10]]"))
    lock = None
    try:
        session = header(read_until(sock, b"\r\n\r\n"), "X-Session-Id")
        lock = StoreWriteLock(tmp_path)
        read_until(sock, b"[turns=1]")  # the last delta: droidpool records the turn next
        time.sleep(0.2)
        hang_up(sock, reset=False)
        time.sleep(0.3)
    finally:
        if lock is not None:
            lock.release()
        sock.close()
    wait_until(lambda: settled(daemon) and events(daemon, "turn"), 5, "the turn to end")
    time.sleep(0.3)
    row = session_row(tmp_path, session)
    assert row["turns"] + row["failed_turns"] == 1, row
    assert (row["input_tokens"], row["output_tokens"]) == (100, 10), row
    assert [(t[1], t[2]) for t in row["ledger"]] == [(100, 10)], row
    assert_quiet(daemon)


# --- 5. more parked agents than workers ----------------------------------------------------------------


def park(daemon: Daemon, city: str) -> tuple[list[Any], dict[str, Any]]:
    """A non-streamed request whose turn parks on a client tool call; (messages, the answer's message)."""
    messages: list[Any] = [{"role": "user", "content": ask(city)}]
    status, _, answer = post(daemon, "/v1/chat/completions", {"model": MODEL, "tools": [WEATHER], "messages": messages})
    assert status == 200, (city, status, answer)  # never a 429
    assert answer["choices"][0]["finish_reason"] == "tool_calls", answer
    return messages, answer["choices"][0]["message"]


def results(daemon: Daemon, agent: tuple[list[Any], dict[str, Any]], result: str) -> dict[str, Any]:
    messages, call_message = agent
    call = call_message["tool_calls"][0]
    status, _, answer = post(daemon, "/v1/chat/completions", {"model": MODEL, "tools": [WEATHER], "messages": [
        *messages, call_message, {"role": "tool", "tool_call_id": call["id"], "content": result}]})
    assert status == 200 and answer["choices"][0]["finish_reason"] == "stop", answer
    return dict(answer)


def test_parked_agents_yield_their_workers_to_waiting_requests(tmp_path: Path, cleanup: list[Daemon]) -> None:
    daemon = start_daemon(tmp_path, sections(tmp_path, {"max_workers": 2, "idle_min": 1, "queue_timeout_s": 30.0},
                                             tools={"park_timeout_s": 300.0}))
    cleanup.append(daemon)
    agents = []
    for index in range(4):  # 4 agents, 2 workers: each parks a turn and sends no results (yet)
        started = time.monotonic()
        agents.append(park(daemon, f"city-{index}"))
        assert time.monotonic() - started < 5
        body = readyz(daemon)
        assert body["client_tools"]["parked"] == min(index + 1, 2), (index, body)
        assert body["workers"]["busy"] <= 2 and body["workers"]["queued"] == 0, body
    yielded = events(daemon, "turn.park_yielded")
    assert len(yielded) == 2, yielded  # agents 0 and 1, the oldest parks, for agents 2 and 3
    # A plain request is answered at once: the oldest park left (agent 2's) yields.
    started = time.monotonic()
    status, _, answer = chat(daemon, "plain question")
    plain_s = time.monotonic() - started
    assert status == 200 and answer["choices"][0]["finish_reason"] == "stop", answer
    assert plain_s < 3, plain_s
    yielded = events(daemon, "turn.park_yielded")
    assert len(yielded) == 3 and all(y["level"] == "info" for y in yielded), yielded
    assert len(events(daemon, "turn.park_ended")) == 3
    # Agent 0's park yielded long ago: its results still continue its conversation, as a message
    # to the same droid session (the fake answers with the session's user message count).
    answer = results(daemon, agents[0], "Sunny")
    assert answer["choices"][0]["message"]["content"].endswith("[turns=2]"), answer
    assert len(events(daemon, "turn.tool_results_fallback")) == 1
    # Agent 3's park is still there: its results resume droid's own turn.
    answer = results(daemon, agents[3], "Rain")
    assert answer["choices"][0]["message"]["content"] == "Tool said: Rain", answer
    assert len(events(daemon, "turn.resumed")) == 1
    assert [t["http_status"] for t in events(daemon, "turn")] == [200] * 7
    wait_until(lambda: settled(daemon), 10, "no park left")
    metrics = urllib.request.urlopen(daemon.base_url + "/metrics", timeout=10).read().decode()
    for event, count in (("parked", 4), ("resumed", 1), ("tool_results_fallback", 1), ("park_refused", 0)):
        assert f'droidpool_tool_events_total{{event="{event}"}} {count}.0' in metrics, event
    assert_quiet(daemon)


def test_park_yields_are_counted_in_the_metrics(tmp_path: Path, cleanup: list[Daemon]) -> None:
    """``droidpool_tool_events_total`` counts parks, resumes, expiries, refusals: yields too."""
    daemon = start_daemon(tmp_path, sections(tmp_path, {"max_workers": 1, "idle_min": 1},
                                             tools={"park_timeout_s": 300.0}))
    cleanup.append(daemon)
    park(daemon, "Quito")
    assert chat(daemon, "plain")[0] == 200
    assert len(events(daemon, "turn.park_yielded")) == 1
    metrics = urllib.request.urlopen(daemon.base_url + "/metrics", timeout=10).read().decode()
    counted = sorted(line for line in metrics.splitlines() if line.startswith("droidpool_tool_events_total"))
    assert 'droidpool_tool_events_total{event="park_yielded"} 1.0' in counted, counted


# --- 6. /v1/models during start-up --------------------------------------------------------------------


def test_models_listed_during_start_up_are_droids(tmp_path: Path) -> None:
    extra = "custom:fake-listed-by-droid"
    config = sections(tmp_path, {"max_workers": 2},
                      droid_env={"FAKE_DROID_START_DELAY_MS": "2500", "FAKE_DROID_MODELS": extra})
    port = free_port()
    config["server"] = {"port": port, "state_dir": str(tmp_path / "state")}
    path = write_config(tmp_path / "droidpool.toml", config)
    log_path = tmp_path / "droidpool.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "droidpool", "serve", "--config", str(path)], cwd=tmp_path,
            stdout=log_file, stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("DROIDPOOL_")})
    daemon = Daemon(process, port, log_path)
    try:
        def listening() -> bool:
            assert process.poll() is None, daemon.log()
            try:
                return daemon.get("/healthz")[0] == 200
            except (OSError, ValueError):
                return False

        wait_until(listening, 20, "the listener", interval=0.02)
        before = readyz(daemon)["workers"]
        started = time.monotonic()
        status, listed = daemon.get("/v1/models")
        waited_s = time.monotonic() - started
        assert before["ready"] + before["idle"] == 0, before  # asked before any worker was up
        assert status == 200, listed
        ids = [m["id"] for m in listed["data"]]
        assert extra in ids and "custom:fake-echo" in ids, ids  # droid's own list, not just the config's
        assert waited_s < 10, waited_s
        # Anthropic's shape, the same wait.
        request = urllib.request.Request(daemon.base_url + "/v1/models", headers={"anthropic-version": "2023-06-01"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert extra in [m["id"] for m in json.load(response)["data"]]
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.log()
