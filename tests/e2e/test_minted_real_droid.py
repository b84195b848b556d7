"""Minted sessions on the real droid: 50 new conversations through one process with nothing leaking
upstream, a deliberately broken format caught by the self-test, and the fresh-process fallback."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from droidpool.droid import minted
from tests.conftest import Daemon, FakeLLMProcess, start_daemon, write_droid_home
from tests.unit import harness

pytestmark = pytest.mark.real_droid
MODELS = ("custom:fake-echo", "custom:fake-named", "custom:fake-reasoning")


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory: pytest.TempPathFactory, real_droid: str, fake_llm: FakeLLMProcess) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("minted")
    home = write_droid_home(tmp / "home", fake_llm.url)
    daemon = start_daemon(tmp, {
        "droid": {"binary": real_droid, "home": str(home), "airgap": True},
        "pool": {"max_workers": 1, "idle_min": 1, "idle_max": 1},
        "auth": {"keys": [{"name": "tools", "key": "tools-secret", "autonomy": "low", "tools": ["read-cli"]},
                          {"name": "plain", "key": "plain-secret"}]},
    }, ready_timeout=60)
    yield daemon
    assert daemon.stop() == 0, daemon.log()


def metric(daemon: Daemon, name: str, key: str) -> float:
    import urllib.request

    request = urllib.request.Request(daemon.base_url + "/metrics", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_fifty_new_conversations_through_one_process_never_see_each_other(
    one_worker: Daemon, fake_llm: FakeLLMProcess
) -> None:
    status, ready = one_worker.get("/readyz")
    assert status == 200 and ready["sessions"] == {"mode": "minted", "self_test": "ok"}
    clients = {name: openai.OpenAI(base_url=one_worker.base_url + "/v1", api_key=f"{name}-secret", max_retries=0,
                                   timeout=60) for name in ("tools", "plain")}
    run = uuid.uuid4().hex[:6]
    codes = [f"code-{run}-{i}x" for i in range(50)]
    for i, code in enumerate(codes):
        key = "tools" if i % 2 else "plain"
        answer = clients[key].chat.completions.create(
            model=MODELS[i % len(MODELS)],
            messages=[{"role": "system", "content": f"prompt-{run}-{i}"}, {"role": "user", "content": f"remember {code}"}],
        )
        assert answer.choices[0].message.content
    for client in clients.values():
        client.close()
    for i, code in enumerate(codes):
        upstream = fake_llm.answer_requests(code)
        assert len(upstream) == 1, code
        request = upstream[0]
        text = json.dumps(request["messages"])
        assert not [other for other in codes if other != code and other in text], f"conversation {i} leaked"
        roles = [m["role"] for m in request["messages"]]
        assert roles == ["system", "user", "user"], roles  # as from a fresh process: system, context, user
        assert f"prompt-{run}-{i}" in request["messages"][0]["content"]
        assert not any(f"prompt-{run}-{j}\"" in text for j in range(50) if j != i)
        # Per key: droid's read tool only for the key that may use it.
        assert ("Read" in request["tools"]) == bool(i % 2), (i, request["tools"])
    assert metric(one_worker, "droidpool_workers_max", "plain-secret") == 1
    assert metric(one_worker, 'droidpool_pool_events_total{event="spawns_on_request"}', "plain-secret") == 0
    assert metric(one_worker, 'droidpool_pool_events_total{event="sessions_minted"}', "plain-secret") >= 50


@pytest.fixture
def llm_home(tmp_path: Path, fake_llm: FakeLLMProcess) -> Path:
    return write_droid_home(tmp_path / "home", fake_llm.url)


@pytest.mark.anyio
async def test_a_broken_format_is_caught_by_the_self_test_and_nothing_leaks(
    tmp_path: Path, real_droid: str, fake_llm: FakeLLMProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A droid upgrade that needs another format looks like this to droidpool: the session it
    # writes does not load as written (here: no context message, which droid loads as empty).
    original = minted.session_lines
    monkeypatch.setattr(minted, "session_lines", lambda *args: original(*args)[:1])
    write_droid_home(tmp_path / "home", fake_llm.url)
    overrides = {"droid.binary": real_droid, "droid.airgap": True, "pool.models": [], "pool.max_workers": 3,
                 "pool.spawn_timeout_s": 30.0, "deadlines.first_token_s": 30.0}
    async with harness.served(tmp_path, **overrides) as (client, pool):
        assert pool.mode == "fresh" and pool.self_test.startswith("failed: the loaded session holds 0 messages")
        tag = uuid.uuid4().hex[:8]
        for text in (f"secret {tag}", f"hello {tag}"):
            response = await client.post("/v1/chat/completions", json={
                "model": "custom:fake-echo", "messages": [{"role": "user", "content": text}]})
            assert response.status == 200, await response.text()
        hello = fake_llm.answer_requests(f"hello {tag}")
        assert hello and f"secret {tag}" not in json.dumps(hello[0]["messages"])
        assert pool.counters["sessions_minted"] == 0


def test_the_fresh_process_fallback_isolates_on_the_real_droid(
    tmp_path: Path, real_droid: str, fake_llm: FakeLLMProcess, llm_home: Path
) -> None:
    daemon = start_daemon(tmp_path, {
        "droid": {"binary": real_droid, "home": str(llm_home), "airgap": True},
        "pool": {"max_workers": 3, "mint_sessions": False},
    }, ready_timeout=60)
    try:
        assert daemon.get("/readyz")[1]["sessions"]["mode"] == "fresh"
        with openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x", max_retries=0, timeout=60) as client:
            tag = uuid.uuid4().hex[:8]
            for text in (f"secret {tag}", f"hello {tag}"):
                client.chat.completions.create(model="custom:fake-echo",
                                               messages=[{"role": "user", "content": text}])
        hello = fake_llm.answer_requests(f"hello {tag}")
        assert hello and f"secret {tag}" not in json.dumps(hello[0]["messages"])
    finally:
        assert daemon.stop() == 0




def test_a_git_repository_around_the_state_directory_never_reaches_the_llm(
    tmp_path: Path, real_droid: str, fake_llm: FakeLLMProcess, llm_home: Path
) -> None:
    """droid describes each session's directory to the LLM with `git status` and `git log`; the
    workers' directory may sit inside someone's checkout, which must stay out of it."""
    import subprocess

    repo = tmp_path / "checkout"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True, timeout=30)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "HOST-REPO-SECRET-COMMIT"], check=True, timeout=30)
    daemon = start_daemon(tmp_path, {
        "droid": {"binary": real_droid, "home": str(llm_home), "airgap": True},
        "server": {"state_dir": str(repo / "state")},
        "pool": {"max_workers": 2},
    }, ready_timeout=60)
    try:
        tag = uuid.uuid4().hex[:8]
        with openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x", max_retries=0, timeout=60) as client:
            client.chat.completions.create(model="custom:fake-echo", messages=[{"role": "user", "content": f"hi {tag}"}])
        upstream = fake_llm.answer_requests(f"hi {tag}")
        context = json.dumps(upstream[0]["messages"])
        assert "HOST-REPO-SECRET-COMMIT" not in context  # it is there without GIT_CEILING_DIRECTORIES
    finally:
        assert daemon.stop() == 0
