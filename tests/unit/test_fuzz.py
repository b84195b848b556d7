"""Bad input never hurts: thousands of malformed, oversized and adversarial requests."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from droidpool.pool import procfs
from tests.conftest import FAKE_DROID, Daemon, start_daemon

MAX_BODY = 64 * 1024
PATHS = ["/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens", "/v1/responses", "/v1/responses/x",
         "/v1/models", "/v1/sessions", "/v1/sessions/x", "/v1/sessions/x/fork", "/healthz", "/readyz",
         "/metrics", "/v1/chat/completions/", "/v1/../etc/passwd", "/%ff", "/v1/sessions/" + "a" * 2000]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "home").mkdir()
    daemon = start_daemon(tmp, {
        "droid": {"binary": str(FAKE_DROID), "home": str(tmp / "home")},
        "pool": {"max_workers": 2, "models": [{"id": "custom:fake-model"}], "idle_min": 1},
        "server": {"max_body_bytes": MAX_BODY, "log_level": "warning", "body_timeout_s": 1.0},
    })
    yield daemon
    assert daemon.stop() == 0


def send(daemon: Daemon, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def check(status: int, payload: bytes, method: str, path: str = "/v1/chat/completions") -> None:
    assert status < 500, (status, payload[:300])
    if status >= 400 and method != "HEAD":
        body = json.loads(payload)
        error = body["error"]
        if path.startswith("/v1/messages"):  # Anthropic's envelope
            assert body["type"] == "error" and set(error) == {"message", "type"}
        else:
            assert set(error) == {"message", "type", "param", "code"}
        assert "Traceback" not in error["message"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
message = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["user", "assistant", "system", "tool", "developer", "x", 1]) | json_values,
    "content": json_values | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", 1]),
                                                            "text": json_values})),
})
chat_body = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["custom:fake-model", "", "nope"]) | json_values,
    "messages": st.lists(message, max_size=4) | json_values,
    "stream": json_values,
    "stream_options": json_values,
    "n": json_values,
    "reasoning_effort": json_values,
    "session_id": json_values,
    "response_format": json_values,
    "tool_choice": json_values,
    "logprobs": json_values,
})
raw_bodies = st.one_of(
    st.binary(max_size=300),
    chat_body.map(lambda b: json.dumps(b).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),  # deep nesting
    st.binary(min_size=1, max_size=50).map(lambda b: b'{"model": "' + b + b'\xff\xfe", "messages": []}'),  # bad UTF-8
    st.just(b"x" * (MAX_BODY + 1)),  # oversized
)
headers = st.fixed_dictionaries({}, optional={
    "Content-Type": st.sampled_from(["application/json", "application/json; charset=utf-8", "application/vnd.x+json",
                                     "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                     "json", "", "\u00e9"]),
    "Host": st.sampled_from(["localhost", "127.0.0.1", "[::1]:1", "evil.example", "127.0.0.1.evil.example", "",
                             "localhost:99999", "[::1", ":80", "LOCALHOST.", "0.0.0.0"]),
    "Origin": st.sampled_from(["http://evil.example", "null", "http://localhost:3000", "", "file://"])
    | st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=40),
    # Header bytes beyond ASCII (sent as latin-1: arbitrary bytes, mostly not UTF-8). DEL is left
    # out: aiohttp's parser refuses it before any handler runs, with a plain-text 400.
    "X-Session-Id": st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=255, exclude_characters="\x7f"), max_size=80),
    "X-Conversation-Id": st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=255, exclude_characters="\x7f"), max_size=80),
    "X-Request-Id": st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=255, exclude_characters="\x7f"), max_size=300),
    "X-Reasoning-Effort": st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=255, exclude_characters="\x7f"), max_size=20),
    "X-Droid-Autonomy": st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=255, exclude_characters="\x7f"), max_size=20),
    "Authorization": st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"), max_size=80),
    "X-Api-Key": st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=255, exclude_characters="\x7f"), max_size=80),
})


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(method=st.sampled_from(METHODS), path=st.sampled_from(PATHS), body=raw_bodies, header=headers)
def test_malformed_requests_get_4xx_envelopes(daemon: Daemon, method: str, path: str, body: bytes,
                                              header: dict[str, str]) -> None:
    # Only chat requests that parse reach droid: keep most of them invalid, not slow.
    status, payload = send(daemon, method, path, body if method not in ("GET", "HEAD") else None, header)
    check(status, payload, method, path)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=chat_body)
def test_structurally_wrong_chat_requests(daemon: Daemon, body: dict[str, Any]) -> None:
    status, payload = send(daemon, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                           {"Content-Type": "application/json"})
    check(status, payload, "POST")


def test_memory_stays_flat_under_thousands_of_bad_requests(daemon: Daemon) -> None:
    bad = [b"{", b"[" * 5000, b'{"model": 1}', b"x" * (MAX_BODY + 10), b'{"model":"m","messages":[{"role":"x"}]}']
    for body in bad * 60:  # warm-up: allocator pools, caches
        send(daemon, "POST", "/v1/chat/completions", body, {})
    before = procfs.process_rss(daemon.process.pid)
    for body in bad * 400:
        status, payload = send(daemon, "POST", "/v1/chat/completions", body, {})
        check(status, payload, "POST")
    after = procfs.process_rss(daemon.process.pid)
    assert after - before < 16 * 1024 * 1024, (before, after)


def test_a_slow_body_is_cut_off_not_waited_for(daemon: Daemon) -> None:
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\":")
        started = time.monotonic()
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        assert time.monotonic() - started < 8
    assert data.startswith(b"HTTP/1.1 408"), data[:200]


def test_the_daemon_is_still_healthy(daemon: Daemon, tmp_path: Path) -> None:
    status, payload = send(daemon, "POST", "/v1/chat/completions",
                           json.dumps({"model": "custom:fake-model", "messages": [{"role": "user", "content": "ok?"}]}).encode(),
                           {"Content-Type": "application/json"})
    assert status == 200, payload
    assert daemon.process.poll() is None
    assert "Traceback" not in daemon.log()
