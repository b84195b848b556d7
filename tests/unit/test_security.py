"""One test per security rule; each fails if its rule is broken."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp.test_utils import TestClient

from droidpool.config import ALL_TOOL_IDS, load
from droidpool.core.access import Authenticator, Principal, hash_key
from droidpool.droid.launch import launch_spec
from droidpool.pool.pool import Pool
from tests.conftest import FAKE_DROID, start_daemon
from tests.unit.harness import served

pytestmark = pytest.mark.anyio
MODEL = "custom:fake-model"
KEYS = {
    "alice": Principal("alice", models=(MODEL,), autonomy="low", tools=("read-cli",), max_concurrent=1),
    "bob": Principal("bob"),
}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {name}-secret"}


@asynccontextmanager
async def secured(tmp_path: Path) -> AsyncIterator[tuple[TestClient, Pool]]:
    auth = Authenticator([(hash_key(f"{name}-secret"), p) for name, p in KEYS.items()])
    async with served(tmp_path, auth=auth, **{"server.max_body_bytes": 1 << 20}) as served_app:
        yield served_app


def chat(text: str, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


async def test_every_api_route_needs_a_valid_key_but_the_probes(tmp_path: Path) -> None:
    async with secured(tmp_path) as (client, _):
        for method, path in [("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/v1/sessions"),
                             ("GET", "/v1/sessions/x"), ("DELETE", "/v1/sessions/x"), ("GET", "/metrics")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "alice-secret"}):
                response = await client.request(method, path, json=chat("x"), headers=headers)
                assert response.status == 401, (method, path, headers)
                body = await response.json()
                assert body["error"]["type"] == "authentication_error"
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/readyz")).status == 200
        assert (await client.get("/v1/models", headers=bearer("bob"))).status == 200
        assert (await client.get("/v1/models", headers={"X-Api-Key": "bob-secret"})).status == 200


async def test_a_key_is_limited_to_its_models(tmp_path: Path) -> None:
    async with secured(tmp_path) as (client, _):
        response = await client.post("/v1/chat/completions", json=chat("x", model="custom:fake-echo"), headers=bearer("alice"))
        assert response.status == 403
        assert (await response.json())["error"]["code"] == "model_not_allowed"
        assert (await client.post("/v1/chat/completions", json=chat("x", model="custom:fake-echo"),
                                  headers=bearer("bob"))).status == 200


async def test_a_key_never_reaches_another_keys_sessions(tmp_path: Path) -> None:
    async with secured(tmp_path) as (client, _):
        first = await client.post("/v1/chat/completions", json=chat("alice's secret plan"), headers=bearer("alice"))
        session = first.headers["X-Session-Id"]
        answer = (await first.json())["choices"][0]["message"]["content"]
        # By id: to bob it does not exist.
        for method, path in [("GET", f"/v1/sessions/{session}"), ("DELETE", f"/v1/sessions/{session}"),
                             ("POST", f"/v1/sessions/{session}/fork")]:
            assert (await client.request(method, path, headers=bearer("bob"))).status == 404
        stolen = await client.post("/v1/chat/completions", json=chat("more"), headers={**bearer("bob"), "X-Session-Id": session})
        assert stolen.status == 404
        # By resending alice's history: bob gets a new session, not alice's.
        resend = await client.post("/v1/chat/completions", headers=bearer("bob"), json={"model": MODEL, "messages": [
            {"role": "user", "content": "alice's secret plan"}, {"role": "assistant", "content": answer},
            {"role": "user", "content": "go on"}]})
        assert resend.status == 200 and resend.headers["X-Session-Id"] != session
        listed = await (await client.get("/v1/sessions", headers=bearer("bob"))).json()
        assert session not in {s["id"] for s in listed["data"]}
        mine = await (await client.get("/v1/sessions", headers=bearer("alice"))).json()
        assert session in {s["id"] for s in mine["data"]}
        # Conversation ids are per key too.
        a = await client.post("/v1/chat/completions", json=chat("a"), headers={**bearer("alice"), "X-Conversation-Id": "c1"})
        b = await client.post("/v1/chat/completions", json=chat("b"), headers={**bearer("bob"), "X-Conversation-Id": "c1"})
        assert a.headers["X-Session-Id"] != b.headers["X-Session-Id"]


async def test_autonomy_and_tools_come_from_the_key(tmp_path: Path) -> None:
    async with secured(tmp_path) as (client, pool):
        denied = await client.post("/v1/chat/completions", json=chat("x"),
                                   headers={**bearer("alice"), "X-Droid-Autonomy": "high"})
        assert denied.status == 403 and (await denied.json())["error"]["code"] == "autonomy_not_allowed"
        ok = await client.post("/v1/chat/completions", json=chat("x"), headers={**bearer("alice"), "X-Droid-Autonomy": "low"})
        worker = next(w for w in pool.workers if w.session_id == ok.headers["X-Session-Id"])
        assert worker.settings is not None and worker.settings.autonomy == "low"
        assert set(ALL_TOOL_IDS) - set(worker.settings.disabled_tool_ids) == {"read-cli"}
        plain = await client.post("/v1/chat/completions", json=chat("y"), headers=bearer("bob"))
        worker = next(w for w in pool.workers if w.session_id == plain.headers["X-Session-Id"])
        assert worker.settings is not None and worker.settings.autonomy == "off"
        assert set(worker.settings.disabled_tool_ids) == set(ALL_TOOL_IDS)  # no tools unless the key allows


async def test_a_keys_concurrency_limit(tmp_path: Path) -> None:
    async with secured(tmp_path) as (client, _):
        async with anyio.create_task_group() as tg:
            statuses: list[int] = []

            async def slow() -> None:
                statuses.append((await client.post("/v1/chat/completions", json=chat("[[slow:200]]"), headers=bearer("alice"))).status)

            tg.start_soon(slow)
            await anyio.sleep(0.3)
            second = await client.post("/v1/chat/completions", json=chat("x"), headers=bearer("alice"))
            assert second.status == 429 and (await second.json())["error"]["code"] == "key_concurrency_limit"
            assert (await client.post("/v1/chat/completions", json=chat("x"), headers=bearer("bob"))).status == 200
        assert statuses == [200]


async def test_metrics_are_exposed_to_a_keyholder(tmp_path: Path) -> None:
    async with secured(tmp_path) as (client, _):
        await client.post("/v1/chat/completions", json=chat("x [[usage:5,3]]"), headers=bearer("bob"))
        text = await (await client.get("/metrics", headers=bearer("bob"))).text()
        assert 'droidpool_requests_total{status="200",stream="false"} 1.0' in text
        assert 'droidpool_workers{state="idle"}' in text
        assert 'droidpool_tokens_total{kind="input"} 5.0' in text
        assert "droidpool_time_to_first_token_seconds_bucket" in text
        assert 'droidpool_pool_events_total{event="spawns"}' in text


async def test_each_session_works_in_its_own_directory(tmp_path: Path) -> None:
    async with secured(tmp_path) as (client, pool):
        dirs = set()
        for i in range(2):
            response = await client.post("/v1/chat/completions", json=chat(f"s{i}"), headers=bearer("bob"))
            worker = next(w for w in pool.workers if w.session_id == response.headers["X-Session-Id"])
            assert worker.session_dir is not None and worker.session_dir.is_dir()
            assert worker.session_dir.is_relative_to(tmp_path / "state")
            dirs.add(worker.session_dir)
        assert len(dirs) == 2


def test_prompts_and_secrets_never_reach_argv_or_logs(tmp_path: Path) -> None:
    """A prompt travels only over stdin; FACTORY_API_KEY and API keys appear in no log line,
    no argv, no error body."""
    import urllib.error
    import urllib.request

    (tmp_path / "home").mkdir()
    api_key = "dp-key-0123456789-very-secret"
    factory_key = "fk-factory-key-also-secret"
    daemon = start_daemon(tmp_path, {
        "droid": {"binary": str(FAKE_DROID), "home": str(tmp_path / "home")},
        "pool": {"models": [{"id": MODEL}], "idle_min": 1},
        "server": {"log_level": "info"},
        "auth": {"keys": [{"name": "ops", "key": api_key}]},
    }, env={"FACTORY_API_KEY": factory_key})
    marker = "PROMPT-MARKER-7f3a"
    bodies = []
    try:
        for headers in ({"Authorization": f"Bearer {api_key}"}, {"Authorization": f"Bearer {api_key}x"}):
            request = urllib.request.Request(daemon.base_url + "/v1/chat/completions", headers={
                "Content-Type": "application/json", **headers}, data=json.dumps(chat(f"{marker} [[slow:100]]")).encode())
            try:
                with urllib.request.urlopen(request, timeout=20) as response:
                    bodies.append(response.read().decode())
            except urllib.error.HTTPError as exc:
                bodies.append(exc.read().decode())
        argvs = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    argvs.append((entry / "cmdline").read_bytes().decode(errors="replace"))
                except OSError:
                    pass
    finally:
        daemon.stop()
    assert not any(marker in argv or api_key in argv or factory_key in argv for argv in argvs)
    log = daemon.log()
    assert marker not in log  # prompts only at debug level
    for secret in (api_key, factory_key):
        assert secret not in log
        assert not any(secret in body for body in bodies)
    assert '"key": "ops"' in log  # the key's name is logged, never its value


def test_the_worker_environment_carries_the_factory_key_but_never_droidpools_settings(tmp_path: Path) -> None:
    from droidpool.droid.launch import worker_env

    config = load(None, environ={}, overrides={"droid.binary": str(FAKE_DROID), "server.state_dir": str(tmp_path)})
    env = worker_env(config, {"FACTORY_API_KEY": "fk", "DROIDPOOL_API_KEY": "dp", "PATH": os.environ["PATH"]})
    assert env["FACTORY_API_KEY"] == "fk" and "DROIDPOOL_API_KEY" not in env
    assert env["FACTORY_LOG_FILE"] == "/dev/null"
    spec = launch_spec(config)
    assert "fk" not in repr(spec) and list(spec.argv[1:]) == [
        "exec", "--input-format", "stream-jsonrpc", "--output-format", "stream-jsonrpc"]


def test_safe_defaults() -> None:
    config = load(None, environ={})
    assert config.server.host == "127.0.0.1"
    assert config.droid.autonomy == "off" and config.droid.enabled_tools == ()
    assert config.droid.permission_policy == "cancel"
