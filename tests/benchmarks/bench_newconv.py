"""New conversations without waiting for a process: droidpool next to raw pre-initialized droid.

Run from the repository root::

    python -m tests.benchmarks.bench_newconv [--rounds N] [--expired N]

droidpool runs at its defaults (only the droid binary, its HOME and airgap are set) against the
scripted fake LLM, next to raw droid JSON-RPC processes driven directly, in one run:

1. ``sequential``: 8 new conversations one after another. droidpool: time to first token over
   streaming HTTP (model ``custom:fake-paced``, whose first chunk comes at once). Raw: a
   pre-initialized process (spawned, ``initialize_session`` with a system prompt and a preset
   title, done ahead) from ``add_user_message`` to its first delta, a fresh one each time. The
   daemon's ``spawns_on_request`` counter shows whether a request ever waited for a process.
2. ``concurrent``: wall time of 8 new conversations streamed at once, over the wall time of one
   alone; the same on 8 raw pre-initialized processes. droidpool's pool is warmed first by one
   such burst (its workers then stay, as they would under bursty load), as the raw processes
   are spawned ahead. Target: droidpool's ratio within 1.1 x the raw one.
3. ``rss``: 100 new conversations (``custom:fake-echo``) through a pool of 2 workers, two at a
   time; the workers' resident memory every 10 conversations and how often they were recycled.
4. with ``--expired N``: N expired droid sessions (folders) on disk in droidpool's worker
   directory; new-conversation TTFT before and after ``droidpool sessions prune-files --apply``.

Every process started here is stopped and reaped on the way out, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from droidpool.config import ALL_TOOL_IDS
from tests.benchmarks.bench_ttft import _GROUPS, MACHINE_ID, RpcDroid, droid_env, killpg, p90
from tests.conftest import (
    Daemon,
    FakeLLMProcess,
    real_droid_path,
    start_daemon,
    write_config,
    write_droid_home,
)

PACED = "custom:fake-paced"
ECHO = "custom:fake-echo"
REQUEST_TIMEOUT_S = 60.0
SEQUENTIAL = 8
CONCURRENT = 8
TARGET_MAX_S, TARGET_MEDIAN_S, TARGET_RATIO = 0.30, 0.20, 1.1


async def stream(http: aiohttp.ClientSession, base: str, model: str, text: str) -> tuple[float, float]:
    """One new conversation, streamed: (seconds to the first text, seconds to the end)."""
    body = {"model": model, "stream": True, "messages": [{"role": "system", "content": "You are terse."},
                                                          {"role": "user", "content": text}]}
    started = time.perf_counter()
    first: float | None = None
    async with asyncio.timeout(REQUEST_TIMEOUT_S):
        async with http.post(f"{base}/v1/chat/completions", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
            async for line in response.content:
                if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                    first = first or time.perf_counter()
                if b'"error"' in line:
                    raise RuntimeError(f"in-band error: {line!r}")
    if first is None:
        raise RuntimeError("no text")
    return first - started, time.perf_counter() - started


async def metrics(http: aiohttp.ClientSession, base: str) -> dict[str, float]:
    async with http.get(f"{base}/metrics") as response:
        out = {}
        for line in (await response.text()).splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


async def settle(http: aiohttp.ClientSession, base: str, timeout: float = 60.0) -> dict[str, Any]:
    """Wait until no droid is starting or busy; the pool's counts then."""
    async with asyncio.timeout(timeout):
        while True:
            async with http.get(f"{base}/readyz") as response:
                body = await response.json()
            if body["workers"]["starting"] == 0 and body["workers"]["busy"] == 0:
                return dict(body)
            await asyncio.sleep(0.05)


async def raw_droid(binary: str, env: dict[str, str], work: Path) -> RpcDroid:
    """A raw droid with a new session initialized as droidpool would: own cwd, system prompt,
    preset title, no tools."""
    droid = await RpcDroid.start(binary, env, work)
    cwd = work / uuid.uuid4().hex
    cwd.mkdir()
    await droid.call("droid.initialize_session", {
        "machineId": MACHINE_ID, "cwd": str(cwd), "modelId": PACED, "systemPrompt": "You are terse.",
        "disabledToolIds": list(ALL_TOOL_IDS)}, 30)
    await droid.call("droid.rename_session", {"title": "droidpool"}, 30)
    return droid


async def raw_turn(droid: RpcDroid, text: str) -> tuple[float, float]:
    started = time.perf_counter()
    ttft_ms = await droid.timed_turn(text)
    return ttft_ms / 1000, time.perf_counter() - started


def summary(label: str, seconds: list[float]) -> str:
    s = sorted(x * 1000 for x in seconds)
    return (f"{label:<34} n={len(s):<3} median {statistics.median(s):7.1f} ms   p90 {p90(s):7.1f} ms   "
            f"max {s[-1]:7.1f} ms")


async def sequential(daemon: Daemon, binary: str, env: dict[str, str], work: Path) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        await settle(http, daemon.base_url)
        before = await metrics(http, daemon.base_url)
        pool: list[float] = []
        raw: list[float] = []
        for i in range(SEQUENTIAL):
            await settle(http, daemon.base_url)
            pool.append((await stream(http, daemon.base_url, PACED, f"sequential {i} {uuid.uuid4().hex}"))[0])
            droid = await raw_droid(binary, env, work)
            try:
                raw.append((await raw_turn(droid, f"sequential {i} {uuid.uuid4().hex}"))[0])
            finally:
                await droid.stop()
            print(f"sequential {i + 1}/{SEQUENTIAL}: droidpool {pool[-1] * 1000:.0f} ms, raw {raw[-1] * 1000:.0f} ms",
                  flush=True)
        after = await metrics(http, daemon.base_url)
    key = 'droidpool_pool_events_total{event="spawns_on_request"}'
    return {"pool": pool, "raw": raw, "spawns_on_request": after.get(key, 0) - before.get(key, 0)}


async def concurrent(daemon: Daemon, binary: str, env: dict[str, str], work: Path, rounds: int) -> dict[str, Any]:
    out: dict[str, list[float]] = {"pool_one": [], "pool_all": [], "raw_one": [], "raw_all": []}
    async with aiohttp.ClientSession() as http:
        # Warm-up: one burst grows the pool to what a burst needs; the workers stay.
        await asyncio.gather(*(stream(http, daemon.base_url, PACED, f"warm-up {i}") for i in range(CONCURRENT)))
        for r in range(rounds):
            await settle(http, daemon.base_url)
            out["pool_one"].append((await stream(http, daemon.base_url, PACED, f"one {r} {uuid.uuid4().hex}"))[1])
            await settle(http, daemon.base_url)
            started = time.perf_counter()
            await asyncio.gather(*(stream(http, daemon.base_url, PACED, f"all {r} {i} {uuid.uuid4().hex}")
                                   for i in range(CONCURRENT)))
            out["pool_all"].append(time.perf_counter() - started)
            droids = [await raw_droid(binary, env, work) for _ in range(CONCURRENT + 1)]
            try:
                out["raw_one"].append((await raw_turn(droids[0], f"one {r} {uuid.uuid4().hex}"))[1])
                started = time.perf_counter()
                await asyncio.gather(*(raw_turn(d, f"all {r} {i} {uuid.uuid4().hex}") for i, d in enumerate(droids[1:])))
                out["raw_all"].append(time.perf_counter() - started)
            finally:
                await asyncio.gather(*(d.stop() for d in droids))
            print(f"concurrent round {r + 1}/{rounds}: droidpool {out['pool_all'][-1] / out['pool_one'][-1]:.2f}x, "
                  f"raw {out['raw_all'][-1] / out['raw_one'][-1]:.2f}x", flush=True)
        workers = (await settle(http, daemon.base_url))["workers"]
    return {**out, "workers_after": workers}


async def rss(daemon: Daemon) -> dict[str, Any]:
    samples: list[tuple[int, float, float]] = []
    async with aiohttp.ClientSession() as http:
        for start in range(0, 100, 2):
            await asyncio.gather(*(stream(http, daemon.base_url, ECHO, f"rss {n} {uuid.uuid4().hex}")
                                   for n in (start, start + 1)))
            if (start + 2) % 10 == 0:
                await settle(http, daemon.base_url)
                await asyncio.sleep(1.2)  # the supervisor measures RSS about once a second
                m = await metrics(http, daemon.base_url)
                samples.append((start + 2, m.get("droidpool_workers_rss_bytes", 0) / 2**20,
                                m.get('droidpool_pool_events_total{event="recycles"}', 0)))
    return {"samples": samples}


def expired_sessions(home: Path, work: Path, count: int) -> None:
    """``count`` old droid sessions that droidpool's workers ran and the store no longer knows."""
    root = home / ".factory" / "sessions"
    old = time.time() - 10 * 86400
    for _ in range(count):
        sid = str(uuid.uuid4())
        cwd = work / "sessions" / uuid.uuid4().hex
        folder = root / str(cwd).replace("/", "-")
        folder.mkdir(parents=True)
        (folder / f"{sid}.settings.json").write_text('{"model": "custom:fake-echo"}')
        (folder / f"{sid}.jsonl").write_text(json.dumps({"type": "session_start", "id": sid, "title": "x",
                                                         "owner": "unknown", "version": 2, "cwd": str(cwd)}) + "\n")
        for path in (folder / f"{sid}.settings.json", folder / f"{sid}.jsonl"):
            os.utime(path, (old, old))


async def new_conversations(daemon: Daemon, count: int) -> list[float]:
    async with aiohttp.ClientSession() as http:
        out = []
        for i in range(count):
            await settle(http, daemon.base_url)
            out.append((await stream(http, daemon.base_url, ECHO, f"expired {i} {uuid.uuid4().hex}"))[0])
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the concurrent comparison")
    parser.add_argument("--expired", type=int, default=0, help="expired sessions on disk for part 4")
    args = parser.parse_args()
    binary = real_droid_path()
    if binary is None:
        raise SystemExit("the real droid CLI is needed (set DROIDPOOL_TEST_DROID)")
    tmp = Path(tempfile.mkdtemp(prefix="droidpool-bench-newconv-"))
    llm = FakeLLMProcess()
    daemons: list[Daemon] = []
    try:
        home = write_droid_home(tmp / "home", llm.url)
        env = droid_env(home)
        work = tmp / "raw"
        work.mkdir()
        defaults = {"droid": {"binary": binary, "home": str(home), "airgap": True}}
        (tmp / "defaults").mkdir()
        daemon = start_daemon(tmp / "defaults", defaults, ready_timeout=60)
        daemons.append(daemon)
        print(f"droidpool at its defaults + droid {binary}; readyz: {daemon.get('/readyz')[1]}", flush=True)
        seq = asyncio.run(sequential(daemon, binary, env, work))
        con = asyncio.run(concurrent(daemon, binary, env, work, args.rounds))
        daemon.stop()
        daemons.remove(daemon)
        (tmp / "rss").mkdir()
        daemon = start_daemon(tmp / "rss", {**defaults, "pool": {"max_workers": 2}}, ready_timeout=60)
        daemons.append(daemon)
        mem = asyncio.run(rss(daemon))
        daemon.stop()
        daemons.remove(daemon)
        grown: dict[str, list[float]] = {}
        if args.expired:
            (tmp / "expired").mkdir()
            config = {**defaults, "server": {"state_dir": str(tmp / "expired" / "state")}}
            daemon = start_daemon(tmp / "expired", config, ready_timeout=60)
            daemons.append(daemon)
            t0 = time.perf_counter()
            expired_sessions(home, tmp / "expired" / "state" / "work", args.expired)
            print(f"{args.expired} expired sessions written in {time.perf_counter() - t0:.1f} s", flush=True)
            grown["before"] = asyncio.run(new_conversations(daemon, 10))
            t0 = time.perf_counter()
            path = write_config(tmp / "expired" / "prune.toml", config)
            subprocess.run([sys.executable, "-m", "droidpool", "sessions", "prune-files", "--config", str(path),
                            "--apply"], check=True, capture_output=True, timeout=600)
            print(f"pruned in {time.perf_counter() - t0:.1f} s", flush=True)
            grown["after"] = asyncio.run(new_conversations(daemon, 10))
            daemon.stop()
            daemons.remove(daemon)

        print()
        print(f"1. {SEQUENTIAL} sequential new conversations, time to first token:")
        print(summary("droidpool (defaults)", seq["pool"]))
        print(summary("raw pre-initialized droid", seq["raw"]))
        worst, median = max(seq["pool"]), statistics.median(seq["pool"])
        ok = worst <= TARGET_MAX_S and median <= TARGET_MEDIAN_S and seq["spawns_on_request"] == 0
        print(f"   droidpool max {worst * 1000:.0f} ms, median {median * 1000:.0f} ms, spawns on the request path "
              f"{seq['spawns_on_request']:.0f}: {'within' if ok else 'OVER'} the targets "
              f"({TARGET_MAX_S * 1000:.0f} ms each, {TARGET_MEDIAN_S * 1000:.0f} ms median, no spawn)")
        print(f"2. {CONCURRENT} concurrent new conversations, wall time / one conversation's:")
        pool_ratio = statistics.median(con["pool_all"]) / statistics.median(con["pool_one"])
        raw_ratio = statistics.median(con["raw_all"]) / statistics.median(con["raw_one"])
        print(f"   droidpool {pool_ratio:.2f}x ({statistics.median(con['pool_all']):.2f} s / "
              f"{statistics.median(con['pool_one']):.2f} s); raw droid {raw_ratio:.2f}x "
              f"({statistics.median(con['raw_all']):.2f} s / {statistics.median(con['raw_one']):.2f} s)")
        verdict = "within" if pool_ratio <= raw_ratio * TARGET_RATIO else "OVER"
        print(f"   droidpool / raw = {pool_ratio / raw_ratio:.2f}: {verdict} the {TARGET_RATIO} target; "
              f"workers after: {con['workers_after']}")
        print("3. 100 conversations through 2 workers: RSS of all workers (MB) and recycles so far:")
        print("   " + ", ".join(f"{n}: {mb:.0f} MB/{rec:.0f}" for n, mb, rec in mem["samples"]))
        if grown:
            print(f"4. new conversations with {args.expired} expired sessions on disk, then after pruning:")
            print(summary(f"with {args.expired} expired", grown["before"]))
            print(summary("after prune-files", grown["after"]))
    finally:
        for daemon in daemons:
            with contextlib.suppress(Exception):
                daemon.stop()
        llm.stop()
        for group in list(_GROUPS):
            killpg(group, 9)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
