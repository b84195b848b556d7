"""The HTTP API through aiohttp's test server, with a real pool of fake droid workers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from aiohttp.test_utils import TestClient

from droidpool.api.app import build_app
from droidpool.config import load
from droidpool.daemon.service import build_turns, open_configured_pool
from droidpool.droid.worker import WorkerState
from droidpool.store import SqliteStore
from tests.conftest import FAKE_DROID
from tests.unit.harness import MODEL, DaemonTestServer, served

pytestmark = pytest.mark.anyio


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


async def sse_events(response: Any) -> list[Any]:
    raw = (await response.read()).decode()
    out: list[Any] = []
    for block in raw.split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            out.append(data if data == "[DONE]" else orjson.loads(data))
        elif block.startswith(":"):
            out.append(block)
    return out


def content(events: list[Any]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for e in events if isinstance(e, dict) and e.get("choices")
    )


async def test_stream_has_the_openai_shape(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        response = await client.post("/v1/chat/completions", json=chat("hi", stream=True, stream_options={"include_usage": True}))
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["X-Session-Id"] and response.headers["X-Request-Id"]
        events = await sse_events(response)
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        deltas = [e for e in events[1:] if isinstance(e, dict) and e["choices"] and e["choices"][0]["delta"].get("content")]
        assert len(deltas) == 4
        assert events[-3]["choices"][0]["finish_reason"] == "stop"
        assert events[-2]["choices"] == [] and events[-2]["usage"]["total_tokens"] > 0
        assert events[-1] == "[DONE]"
        assert len({e["id"] for e in events if isinstance(e, dict)}) == 1


async def test_non_streaming_completion(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        response = await client.post("/v1/chat/completions", json=chat("hi [[usage:11,5]]", temperature=0.3))
        assert response.status == 200
        assert response.headers["X-Droidpool-Ignored-Params"] == "temperature"
        body = await response.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["choices"][0]["message"]["content"].endswith("[turns=1]")
        assert body["usage"]["prompt_tokens"] == 11 and body["usage"]["completion_tokens"] == 5


async def test_continuity_by_resend_header_and_body(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        first = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": [
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "one"}]})
        session = first.headers["X-Session-Id"]
        answer = (await first.json())["choices"][0]["message"]["content"]
        assert "[system=be brief]" in answer
        resend = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": [
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "one"},
            {"role": "assistant", "content": answer}, {"role": "user", "content": "two"}]})
        assert resend.headers["X-Session-Id"] == session
        assert (await resend.json())["choices"][0]["message"]["content"].endswith("[turns=2]")
        by_header = await client.post("/v1/chat/completions", json=chat("three"), headers={"X-Session-Id": session})
        assert (await by_header.json())["choices"][0]["message"]["content"].endswith("[turns=3]")
        by_body = await client.post("/v1/chat/completions", json=chat("four", session_id=session))
        assert (await by_body.json())["choices"][0]["message"]["content"].endswith("[turns=4]")
        # An edited history does not continue the session.
        edited = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": [
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "one (edited)"},
            {"role": "assistant", "content": answer}, {"role": "user", "content": "two"}]})
        assert edited.headers["X-Session-Id"] != session
        sessions = await (await client.get("/v1/sessions")).json()
        mine = next(s for s in sessions["data"] if s["id"] == session)
        assert mine["turns"] == 4


@pytest.mark.parametrize(
    ("method", "path", "data", "status", "code"),
    [
        ("POST", "/v1/chat/completions", b"{not json", 400, None),
        ("POST", "/v1/chat/completions", b'{"model": "custom:fake-model"}', 400, None),
        ("GET", "/v1/nothing", b"", 404, "not_found"),
        ("GET", "/v1/chat/completions", b"", 405, "method_not_allowed"),
        ("POST", "/v1/chat/completions", b'{"model":"nope","messages":[{"role":"user","content":"x"}]}', 404, "model_not_found"),
        ("GET", "/v1/sessions/unknown", b"", 404, "session_not_found"),
        ("DELETE", "/v1/sessions/unknown", b"", 404, "session_not_found"),
    ],
)
async def test_errors_are_openai_envelopes(tmp_path: Path, method: str, path: str, data: bytes, status: int, code: str | None) -> None:
    async with served(tmp_path) as (client, _):
        response = await client.request(method, path, data=data, headers={"Content-Type": "application/json"})
        assert response.status == status
        body = await response.json()
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == code
        assert response.headers["X-Request-Id"]


async def test_oversized_body_is_413(tmp_path: Path) -> None:
    async with served(tmp_path, **{"server.max_body_bytes": 2048}) as (client, _):
        response = await client.post("/v1/chat/completions", json=chat("x" * 5000))
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "request_too_large"


async def test_unknown_session_is_404(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        response = await client.post("/v1/chat/completions", json=chat("x"), headers={"X-Session-Id": "nope"})
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "session_not_found"


async def test_crash_mid_stream_is_reported_in_band_and_the_session_survives(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, pool):
        first = await client.post("/v1/chat/completions", json=chat("start"))
        session = first.headers["X-Session-Id"]
        crashed = await client.post("/v1/chat/completions", json=chat("boom [[crash]]", stream=True), headers={"X-Session-Id": session})
        assert crashed.status == 200
        events = await sse_events(crashed)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "worker_crashed"
        after = await client.post("/v1/chat/completions", json=chat("after"), headers={"X-Session-Id": session})
        assert after.status == 200
        # droid persisted the crashed turn's user message: the session kept all of its history.
        assert (await after.json())["choices"][0]["message"]["content"].endswith("[turns=3]")
        assert pool.counters["crashes"] == 1


async def test_crash_before_output_is_502(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        response = await client.post("/v1/chat/completions", json=chat("[[crash:before]]"))
        assert response.status == 502
        assert (await response.json())["error"]["code"] == "worker_crashed"


async def test_upstream_failure_is_502_with_droids_reason(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        response = await client.post("/v1/chat/completions", json=chat("[[error:401]]"))
        assert response.status == 502
        error = (await response.json())["error"]
        assert "401" in error["message"] and error["code"] == "droid_model_authentication_failed"


async def test_retracted_text_is_not_in_the_answer(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        response = await client.post("/v1/chat/completions", json=chat("flaky [[error:500]]"))
        text = (await response.json())["choices"][0]["message"]["content"]
        assert "retracted-partial" not in text and text.endswith("[turns=1]")


async def test_reasoning_is_streamed_as_reasoning_content(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        events = await sse_events(await client.post("/v1/chat/completions", json=chat("[[reasoning]]", stream=True)))
        reasoning = "".join(e["choices"][0]["delta"].get("reasoning_content") or "" for e in events if isinstance(e, dict) and e.get("choices"))
        assert reasoning


async def test_first_token_deadline_interrupts_and_keeps_the_worker(tmp_path: Path) -> None:
    async with served(tmp_path, **{"deadlines.first_token_s": 0.5}) as (client, pool):
        response = await client.post("/v1/chat/completions", json=chat("[[hang]]"))
        assert response.status == 504
        assert (await response.json())["error"]["code"] == "deadline_exceeded"
        session = response.headers.get("X-Session-Id")
        assert pool.counters["crashes"] == 0
        assert any(w.state is WorkerState.IDLE for w in pool.workers)
        if session:
            ok = await client.post("/v1/chat/completions", json=chat("again"), headers={"X-Session-Id": session})
            assert ok.status == 200


async def test_keepalive_comments_while_droid_is_silent(tmp_path: Path) -> None:
    async with served(tmp_path, **{"server.keepalive_s": 0.1}) as (client, _):
        events = await sse_events(await client.post("/v1/chat/completions", json=chat("[[slow:350]]", stream=True)))
        assert ": keep-alive" in events
        assert events[-1] == "[DONE]"


async def test_full_queue_is_429_with_retry_after(tmp_path: Path) -> None:
    overrides = {"pool.max_workers": 1, "pool.queue_size": 0}
    async with served(tmp_path, **overrides) as (client, _):
        async with anyio.create_task_group() as tg:
            slow: list[int] = []

            async def hold() -> None:
                response = await client.post("/v1/chat/completions", json=chat("[[slow:300]]"))
                slow.append(response.status)

            tg.start_soon(hold)
            await anyio.sleep(0.3)
            response = await client.post("/v1/chat/completions", json=chat("second"))
            assert response.status == 429
            assert int(response.headers["Retry-After"]) >= 1
            assert (await response.json())["error"]["type"] == "rate_limit_error"
        assert slow == [200]


async def test_queued_requests_wait_for_a_free_worker(tmp_path: Path) -> None:
    async with served(tmp_path, **{"pool.max_workers": 1, "pool.queue_size": 4}) as (client, pool):
        statuses: list[int] = []

        async def one(i: int) -> None:
            response = await client.post("/v1/chat/completions", json=chat(f"q{i} [[slow:50]]"))
            statuses.append(response.status)

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(one, i)
        assert statuses == [200, 200, 200]
        assert len(pool.workers) <= 1


async def test_client_disconnect_interrupts_but_keeps_worker_and_session(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, pool):
        response = await client.post("/v1/chat/completions", json=chat("long [[slow:200]]", stream=True))
        session = response.headers["X-Session-Id"]
        await response.content.readline()
        response.close()
        with anyio.fail_after(5):
            while not any(w.session_id == session and w.state is WorkerState.IDLE for w in pool.workers):
                await anyio.sleep(0.05)
        worker = next(w for w in pool.workers if w.session_id == session)
        follow = await client.post("/v1/chat/completions", json=chat("next"), headers={"X-Session-Id": session})
        assert follow.status == 200
        assert next(w for w in pool.workers if w.session_id == session) is worker
        assert pool.counters["crashes"] == 0


async def test_session_api_and_delete(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        first = await client.post("/v1/chat/completions", json=chat("x [[usage:3,2]]"))
        session = first.headers["X-Session-Id"]
        record = await (await client.get(f"/v1/sessions/{session}")).json()
        assert record["turns"] == 1 and record["usage"]["input_tokens"] == 3
        assert (await client.delete(f"/v1/sessions/{session}")).status == 200
        gone = await client.post("/v1/chat/completions", json=chat("y"), headers={"X-Session-Id": session})
        assert gone.status == 404


async def test_models_health_and_readiness(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        models = await (await client.get("/v1/models")).json()
        assert MODEL in {m["id"] for m in models["data"]}
        assert (await client.get("/healthz")).status == 200
        ready = await client.get("/readyz")
        assert ready.status == 200 and (await ready.json())["workers"]["ready"] >= 1


async def test_spawn_failures_make_the_daemon_unready(tmp_path: Path) -> None:
    os.environ["FAKE_DROID_FAIL_START"] = "1"
    try:
        home = tmp_path / "home"
        home.mkdir()
        config = load(None, environ={}, overrides={
            "droid.binary": str(FAKE_DROID), "droid.home": str(home), "server.state_dir": str(tmp_path / "s")})
        store = SqliteStore(config.store_path, 60)
        await store.open()
        async with open_configured_pool(config) as pool:
            assert not await pool.wait_warm(20)
            app = build_app(build_turns(config, pool, store), max_body_bytes=10000, keepalive_s=5)
            async with TestClient(DaemonTestServer(app)) as client:
                ready = await client.get("/readyz")
                assert ready.status == 503
                assert "exit" in (await ready.json())["cause"]
                response = await client.post("/v1/chat/completions", json=chat("x"))
                assert response.status == 503
                assert response.headers.get("Retry-After")
        await store.close()
    finally:
        del os.environ["FAKE_DROID_FAIL_START"]


async def test_default_config_keeps_exactly_one_spare(tmp_path: Path) -> None:
    async with served(tmp_path, **{"pool.models": [], "pool.max_workers": 4}) as (client, pool):
        await anyio.sleep(1.5)  # several reconcile rounds
        assert [w.state for w in pool.workers] == [WorkerState.READY]
        response = await client.post("/v1/chat/completions", json=chat("hi"))
        assert response.status == 200
        with anyio.fail_after(10):
            while sum(w.state is WorkerState.READY for w in pool.workers) < 1:
                await anyio.sleep(0.05)
        await anyio.sleep(1.2)
        assert sorted(w.state.value for w in pool.workers) == ["idle", "ready"]
