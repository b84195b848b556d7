"""New conversations in minted sessions: the self-test, its fallback, the per-load check, the reuse
of idle workers, and what a minted session gives droid. Over fake droid workers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from droidpool.droid import minted as minting
from droidpool.droid import sessions
from droidpool.droid.worker import SessionSettings, WorkerState
from tests.unit.harness import served
from tests.unit.test_sessions import ask, droid_session, turns, user, user_texts

pytestmark = pytest.mark.anyio


async def readyz(client: TestClient) -> dict[str, Any]:
    return dict(await (await client.get("/readyz")).json())


async def test_new_conversations_reuse_idle_workers_in_minted_sessions(tmp_path: Path) -> None:
    async with served(tmp_path, **{"pool.max_workers": 3}) as (client, pool):
        status = await readyz(client)
        assert status["sessions"] == {"mode": "minted", "self_test": "ok"}
        metrics = await (await client.get("/metrics")).text()
        assert "droidpool_minted_sessions 1.0" in metrics
        made = []
        for i in range(6):
            session, answer = await ask(client, [{"role": "system", "content": f"prompt {i}"}, user(f"secret-{i}")])
            assert turns(answer) == 1 and f"[system=prompt {i}]" in answer
            made.append(session)
        assert len(set(made)) == 6
        assert pool.counters["spawns_on_request"] == 0  # never waited for a process
        assert pool.counters["sessions_minted"] == 6
        assert pool.peak_workers <= 2  # the reserve and the one that just ran
        for i, session in enumerate(made):
            record = json.dumps(droid_session(tmp_path, session))
            assert f"secret-{i}" in record
            assert not any(f"secret-{j}" in record for j in range(6) if j != i)
        # Each has a working directory of its own, named after it, and droid's files live in
        # the folder droid names after that directory.
        for session in made:
            cwd = tmp_path / "state" / "work" / "sessions" / session
            assert cwd.is_dir()
            folder = tmp_path / "home" / ".factory" / "sessions" / sessions.folder_name(str(cwd))
            assert (folder / f"{session}.jsonl").is_file() and (folder / f"{session}.settings.json").is_file()
        # And each continues, on whichever worker.
        for session in made:
            again, answer = await ask(client, [user("and again")], {"X-Session-Id": session})
            assert again == session and turns(answer) == 2


async def test_a_minted_session_carries_the_requests_settings(tmp_path: Path) -> None:
    async with served(tmp_path, **{"droid.autonomy": "low", "droid.enabled_tools": ["read-cli"]}) as (client, _):
        session, _ = await ask(client, [{"role": "system", "content": "Be terse."}, user("hello")],
                               model="custom:fake-echo", reasoning_effort="none")
        record = droid_session(tmp_path, session)
        assert record["systemPrompt"] == "Be terse."
        assert record["settings"]["modelId"] == "custom:fake-echo"
        assert record["settings"]["autonomyLevel"] == "low" and record["settings"]["autonomyMode"] == "auto-low"
        assert "read-cli" not in record["settings"]["disabledToolIds"]
        assert "execute-cli" in record["settings"]["disabledToolIds"]


async def test_a_droid_that_cannot_load_minted_sessions_falls_back_to_fresh_processes(tmp_path: Path) -> None:
    async with served(tmp_path, **{"droid.env": {"FAKE_DROID_MINT": "ignore"}, "pool.max_workers": 3}) as (client, pool):
        status = await readyz(client)
        assert status["sessions"]["mode"] == "fresh"
        assert status["sessions"]["self_test"].startswith("failed: droid refused droid.load_session")
        assert "droidpool_minted_sessions 0.0" in await (await client.get("/metrics")).text()
        first, _ = await ask(client, [user("the password is swordfish")])
        second, answer = await ask(client, [user("what is it?")])
        assert first != second and turns(answer) == 1
        assert "swordfish" not in json.dumps(droid_session(tmp_path, second))
        assert pool.counters["sessions_minted"] == 0


async def test_a_minted_load_that_shows_old_history_is_caught_and_never_sent_a_message(tmp_path: Path) -> None:
    # This droid passes the self-test (a fresh process has nothing to leak) but keeps a used
    # process's old conversation when it loads a minted session: the per-load check sees it.
    async with served(tmp_path, **{"droid.env": {"FAKE_DROID_MINT": "stale"}, "pool.max_workers": 2,
                                   "pool.idle_min": 1, "pool.idle_max": 1}) as (client, pool):
        assert pool.mode == "minted"
        first, _ = await ask(client, [user("the password is swordfish")])
        for i in range(3):
            other, answer = await ask(client, [user(f"unrelated {i}")])
            assert other != first and turns(answer) == 1
            assert "swordfish" not in json.dumps(droid_session(tmp_path, other))
        assert pool.mode == "fresh" and pool.self_test.startswith("failed: the loaded session holds")
        assert (await readyz(client))["sessions"]["mode"] == "fresh"
        again, answer = await ask(client, [user("still there?")], {"X-Session-Id": first})
        assert again == first and user_texts(tmp_path, first) == ["the password is swordfish", "still there?"]


async def test_minting_off_starts_every_new_conversation_in_a_fresh_process(tmp_path: Path) -> None:
    async with served(tmp_path, **{"pool.mint_sessions": False}) as (client, pool):
        assert (await readyz(client))["sessions"] == {"mode": "fresh", "self_test": "off (pool.mint_sessions = false)"}
        first, _ = await ask(client, [user("alpha")])
        second, answer = await ask(client, [user("beta")])
        assert turns(answer) == 1 and "alpha" not in json.dumps(droid_session(tmp_path, second))
        assert not any(w.session_id in (first, second) for w in pool.workers if w.state is WorkerState.READY)
        assert pool.counters["sessions_minted"] == 0


async def test_a_session_written_outside_its_cwds_folder_kills_droid_and_is_a_crash(tmp_path: Path) -> None:
    """Observed on droid 0.225.2: droid derives a session file's path from its cwd; a file put
    in another folder loads, then droid exits 1 (ENOENT). The fake does the same; minting never
    does it, and the pool survives it."""
    async with served(tmp_path) as (client, pool):
        worker = next(w for w in pool.workers if w.state in (WorkerState.READY, WorkerState.IDLE))
        home = Path(worker.spec.env["HOME"])
        minted = minting.mint(home / ".factory" / "sessions", tmp_path / "elsewhere", SessionSettings(), "t")
        stray = minted.jsonl_path.parent.with_name("-somewhere-else")
        stray.mkdir()
        for path in (minted.jsonl_path, minted.settings_path):
            path.rename(stray / path.name)
        worker.state = WorkerState.BUSY
        with pytest.raises(Exception, match="exited"):
            await worker.load_session(minted.session_id, 10)
        worker.state = WorkerState.IDLE
        _, answer = await ask(client, [user("fine?")])
        assert turns(answer) == 1


def test_mint_writes_settings_first_and_each_file_whole(tmp_path: Path) -> None:
    settings = SessionSettings(model_id="custom:m", system_prompt="S", reasoning_effort="high", autonomy="medium",
                               disabled_tool_ids=("execute-cli",))
    minted = minting.mint(tmp_path / "sessions", tmp_path / "work", settings, "droidpool", session_id="abc-1")
    assert minted.cwd == tmp_path / "work" / "abc-1" and minted.cwd.is_dir()
    assert minted.jsonl_path.parent.name == str(minted.cwd).replace("/", "-")
    assert json.loads(minted.settings_path.read_text()) == {
        "model": "custom:m", "systemPrompt": "S", "reasoningEffort": "high", "interactionMode": "auto",
        "autonomyLevel": "medium", "autonomyMode": "auto-medium", "disabledToolIds": ["execute-cli"]}
    start, context = (json.loads(line) for line in minted.jsonl_path.read_text().splitlines())
    assert start == {"type": "session_start", "id": "abc-1", "title": "droidpool", "owner": "unknown", "version": 2,
                     "cwd": str(minted.cwd), "isSessionTitleManuallySet": True}
    assert context["message"] == {"role": "user", "content": [], "visibility": "llm_only"}
    assert minted.settings_path.stat().st_mtime_ns <= minted.jsonl_path.stat().st_mtime_ns
    assert not [p for p in minted.jsonl_path.parent.iterdir() if p.name.endswith(".tmp")]


def test_check_loaded_names_each_problem() -> None:
    minted = minting.Minted("s", Path("/w/s"), Path("/x"), Path("/y"))
    settings = SessionSettings(system_prompt="S")
    good = {"session": {"messages": [{"role": "user", "content": [], "visibility": "llm_only"}]},
            "settings": {"systemPrompt": "S"}, "cwd": "/w/s"}
    assert minting.check_loaded(good, minted, settings) == []
    leaked = {**good, "session": {"messages": [{"role": "user", "content": [{"type": "text"}]}, {}]}}
    assert "holds 2 messages" in minting.check_loaded(leaked, minted, settings)[0]
    assert minting.check_loaded({**good, "cwd": "/elsewhere"}, minted, settings)[0].startswith("the loaded session's cwd")
    assert "system prompt" in minting.check_loaded({**good, "settings": {}}, minted, settings)[0]


def test_pruning_keeps_what_live_workers_hold_and_what_is_young(tmp_path: Path) -> None:
    droid_dir, work = tmp_path / "sessions", tmp_path / "work"
    old = time.time() - 10_000
    ids = {name: f"{n:08x}-0000-4000-8000-000000000000" for n, name in
           enumerate(("held", "expired", "unknown-old", "unknown-young", "known"))}
    made = {name: minting.mint(droid_dir, work / "sessions", SessionSettings(), "t", session_id=sid)
            for name, sid in ids.items()}
    for name in ("held", "expired", "unknown-old", "known"):
        for path in (made[name].jsonl_path, made[name].settings_path, made[name].cwd):
            os.utime(path, (old, old))
    known = {ids["held"]: False, ids["expired"]: False, ids["known"]: True}
    plan = sessions.plan_prune(droid_dir, work, known, time.time(), 3600, protected=frozenset({ids["held"]}))
    assert sorted((s.session_id, why) for s, why in plan.sessions) == sorted(
        [(ids["expired"], "expired"), (ids["unknown-old"], "unknown")])
    assert sorted(p.name for p in plan.workdirs) == sorted([ids["expired"], ids["unknown-old"]])
    sessions.apply_prune(plan)
    assert not made["expired"].jsonl_path.exists() and not made["expired"].cwd.exists()
    assert made["held"].jsonl_path.exists() and made["unknown-young"].jsonl_path.exists()
    assert made["known"].cwd.exists()
    assert not made["expired"].jsonl_path.parent.exists()  # droid's folder for it went too


async def test_the_pool_self_tests_again_after_droid_changes(tmp_path: Path) -> None:
    async with served(tmp_path) as (_, pool):
        assert pool.mode == "minted"
        spec = pool.spec
        changed = type(spec)(**{**spec.__dict__, "machine_id": "other"})
        pool.reconfigure(pool.policy, changed)
        assert pool.self_test == "pending" and pool.mode == "fresh"
        assert await pool.wait_warm(15)
        assert pool.mode == "minted" and pool.self_test == "ok"




def test_the_recorded_real_droid_answer_to_a_minted_load_passes_the_check() -> None:
    """droid 0.225.2's own answer to load_session of a session minted with cwd
    /tmp/proto/work/sessions/<id> and system prompt "You are terse." (recorded)."""
    fixture = Path(__file__).parents[1] / "fixtures" / "rpc_load_minted_session.stdout.jsonl"
    lines = [json.loads(line) for line in fixture.read_text().splitlines()]
    result = next(line["result"] for line in lines if line.get("type") == "response")
    session_id = "4f7c2d3e-9a1b-4c5d-8e6f-0a1b2c3d4e5f"
    minted = minting.Minted(session_id, Path("/tmp/proto/work/sessions") / session_id, Path("/x"), Path("/y"))
    settings = SessionSettings(system_prompt="You are terse.")
    assert minting.check_loaded(result, minted, settings) == []
    assert minting.check_loaded(result, minted, SessionSettings(system_prompt="other"))
    # And the turn that follows is a normal one, ending completed.
    kinds = [line["params"]["notification"]["type"] for line in lines if line.get("type") == "notification"]
    assert "assistant_text_delta" in kinds and kinds[-1] == "agent_turn_completed"
