"""The pool with real fake-droid processes: recycling, budgets, slow starts, and chaos."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest

from droidpool.droid.worker import WorkerState
from droidpool.pool import procfs
from tests.unit.harness import served
from tests.unit.test_http import chat

pytestmark = pytest.mark.anyio


def worker_processes() -> list[tuple[int, str]]:
    """This process's fake droid children (the pool's workers), with their state letters."""
    out = []
    for pid, state in procfs.children(os.getpid()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"fake_droid" in cmdline:
            out.append((pid, state))
    return out


async def answer(client: Any, text: str, session: str | None = None) -> tuple[int, dict[str, Any], str | None]:
    headers = {"X-Session-Id": session} if session else {}
    response = await client.post("/v1/chat/completions", json=chat(text), headers=headers)
    return response.status, await response.json(), response.headers.get("X-Session-Id")


async def test_worn_workers_are_recycled_between_turns_invisibly(tmp_path: Path) -> None:
    async with served(tmp_path, **{"pool.max_turns_per_worker": 2}) as (client, pool):
        status, body, session = await answer(client, "one")
        first_worker = next(w for w in pool.workers if w.session_id == session)
        await answer(client, "two", session)
        with anyio.fail_after(5):
            while first_worker.state is not WorkerState.DEAD:
                await anyio.sleep(0.05)
        assert pool.counters["recycles"] == 1
        status, body, _ = await answer(client, "three", session)
        assert status == 200
        assert body["choices"][0]["message"]["content"].endswith("[turns=3]")  # context kept


async def test_memory_budget_evicts_idle_workers_and_sessions_resume(tmp_path: Path) -> None:
    # A fake droid is a ~21 MB python: 50 MB holds two workers, not three.
    budget = 50 * 1024 * 1024
    async with served(tmp_path, **{"pool.memory_budget_mb": 50, "pool.max_workers": 4}) as (client, pool):
        sessions: list[str | None] = []

        async def conversation(i: int) -> None:
            status, _, session = await answer(client, f"conversation {i} [[slow:100]]")
            assert status == 200
            sessions.append(session)

        # At once, so that they need four workers (one after another, one worker serves them all).
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(conversation, i)
        assert len(set(sessions)) == 4
        with anyio.fail_after(10):
            while sum(w.rss for w in pool.workers) > budget or not pool.counters["stops_memory"]:
                await anyio.sleep(0.05)
        for session in sessions:
            status, body, _ = await answer(client, "again", session)
            assert status == 200 and body["choices"][0]["message"]["content"].endswith("[turns=2]")


async def test_slow_starting_workers_time_out_cleanly(tmp_path: Path) -> None:
    os.environ["FAKE_DROID_START_DELAY_MS"] = "3000"
    try:
        async with served(tmp_path, **{"pool.spawn_timeout_s": 0.5, "pool.models": []}) as (client, pool):
            raise AssertionError("a pool whose workers cannot start in time must not become warm")
    except AssertionError as exc:
        if "must not become warm" in str(exc):
            raise
    finally:
        del os.environ["FAKE_DROID_START_DELAY_MS"]
    assert not worker_processes()


async def test_chaos_every_request_completes_or_fails_cleanly(tmp_path: Path) -> None:
    cap = 4
    overrides = {"pool.max_workers": cap, "pool.queue_size": 200, "pool.queue_timeout_s": 30.0,
                 "deadlines.first_token_s": 10.0}
    rng = random.Random(7)
    async with served(tmp_path, **overrides) as (client, pool):
        outcomes: list[int] = []
        samples: list[int] = []
        kills = 0
        sessions: list[str] = []
        finished = anyio.Event()
        limiter = anyio.Semaphore(8)

        async def one(i: int) -> None:
            async with limiter:
                session = rng.choice(sessions) if sessions and rng.random() < 0.5 else None
                text = f"req {i}" + (" [[slow:15]]" if rng.random() < 0.5 else "")
                status, body, sid = await answer(client, text, session)
                if status == 200:
                    assert body["choices"][0]["message"]["content"]
                    if sid and session is None:
                        sessions.append(sid)
                else:
                    assert status in (404, 429, 502, 503, 504), (status, body)
                    assert set(body["error"]) == {"message", "type", "param", "code"}
                outcomes.append(status)

        async def killer() -> None:
            nonlocal kills
            while not finished.is_set():
                await anyio.sleep(rng.uniform(0.05, 0.15))
                victims = [w for w in pool.workers if w.pid and w.alive]
                if victims:
                    try:
                        os.killpg(rng.choice(victims).pid or 0, signal.SIGKILL)
                        kills += 1
                    except ProcessLookupError:
                        pass  # it died on its own meanwhile

        async def sampler() -> None:
            while not finished.is_set():
                samples.append(sum(1 for _, state in worker_processes() if state != "Z"))
                await anyio.sleep(0.02)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(killer)
                tg.start_soon(sampler)
                async with anyio.create_task_group() as requests:
                    for i in range(200):
                        requests.start_soon(one, i)
                finished.set()
        assert len(outcomes) == 200
        assert kills >= 10
        assert outcomes.count(200) >= 100, sorted(set(outcomes))
        assert max(samples) <= cap, max(samples)
        assert pool.peak_workers <= cap
        # The pool returns to its target: its reserve available, every process alive, no zombie.
        def settled() -> bool:
            processes = worker_processes()
            return (sum(w.state in (WorkerState.READY, WorkerState.IDLE) for w in pool.workers) >= 1
                    and not any(w.state in (WorkerState.BUSY, WorkerState.STARTING) for w in pool.workers)
                    and all(w.alive for w in pool.workers)
                    and not any(state == "Z" for _, state in processes)
                    and {pid for pid, _ in processes} == {w.pid for w in pool.workers})

        with anyio.fail_after(20):
            while not settled():
                await anyio.sleep(0.1)
    assert not worker_processes()  # nothing left after the pool stops
