"""The pool under load: TTFT, concurrency, idle memory, a burst at the cap, and session rotation.

Run from the repository root::

    python -m tests.benchmarks.bench_pool [--out DIR] [--keep]

Each scenario runs against its own fresh droidpool subprocess (the real droid CLI, airgapped,
with BYOK models served by the scripted fake LLM ``tests.fakellm``):

1. ``ttft``: time to first token of a new conversation (a warm spare is ready) and of a
   follow-up turn (``X-Session-Id``), alternating, ``custom:fake-paced``;
2. ``concurrency``: wall time of 10 concurrent 3-turn conversations (new + 2 follow-ups by
   ``X-Session-Id``, ``custom:fake-paced``) over the wall time of one such conversation, with
   ``pool.max_workers = 12`` and 10 warm spares ready at the start (target <= 1.3);
3. ``idle_rss``: RSS summed over the daemon and all its descendants (from /proc) once warm,
   with 1 spare and, on another daemon, with 3;
4. ``burst``: 50 new conversations at once with ``pool.max_workers = 4``; live droid processes
   under the daemon are counted every 20 ms (zombies excluded) and must never exceed 4;
5. ``rotation``: 100 conversations (``custom:fake-echo``) through ``pool.max_workers = 8`` and
   ``pool.memory_budget_mb = 8*260``: round 1 starts them all, round 2 sends each a follow-up
   by ``X-Session-Id``. The fake LLM's recorded requests prove whether each round-2 upstream
   request still carried that conversation's round-1 user message. The daemon tree's RSS is
   sampled throughout.

Prints a summary table and the targets, and writes ``bench_pool.png``, ``bench_pool.json`` and
the daemons' logs (``bench_pool_logs/``) into ``--out`` (default ``bench-results/``).
Every process started here is stopped and reaped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.benchmarks.bench_ttft import BenchError, PoolClient, p90, stop_everything
from tests.conftest import Daemon, FakeLLMProcess, real_droid_path, start_daemon, write_droid_home

PACED = "custom:fake-paced"
ECHO = "custom:fake-echo"
MB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")

TTFT_ROUNDS = 10
CONC_CONVERSATIONS = 10
CONC_TURNS = 3
CONC_SINGLE_RUNS = 3  # single-conversation baselines; the median is the denominator
CONC_TARGET = 1.3
BURST_N = 50
BURST_CAP = 4
ROTATION_N = 100
ROTATION_CAP = 8
ROTATION_BUDGET_MB = 8 * 260
ROTATION_CONCURRENCY = 4

DAEMON_READY_S = 60.0  # deadline for a daemon to serve with its first spare warm
WARM_TIMEOUT_S = 60.0  # deadline for the configured spares to be warm
TURN_TIMEOUT_S = 60.0  # deadline for one request, start to [DONE]
BURST_TIMEOUT_S = 180.0  # deadline for the whole burst (queue_timeout_s is 120)
ROUND_TIMEOUT_S = 240.0  # deadline for one rotation round
SETTLE_S = 0.3


# --- /proc ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeSample:
    t: float  # seconds since the sampler started
    droids: int  # live (non-zombie) droid worker processes: the daemon's droid children
    rss_total: int  # bytes: the daemon and every live descendant
    rss_daemon: int  # bytes: the daemon process alone
    droid_pids: tuple[tuple[int, int, str], ...] = ()  # (pid, ppid, state) of each live droid image
    # Every live process below the daemon running the droid image, including droid's own
    # short-lived helpers: droid forks /bin/sh (grep, find, git) and rg, and until the child
    # execs, /proc shows it with droid's command line.
    droid_images: int = 0
    descendants: int = 0  # every live process below the daemon


def _is_droid(pid: int, binary: str) -> bool:
    """Runs the droid image now. Not cached: a fresh fork shows its parent's command line
    until it execs (the daemon's python before droid, droid's before /bin/sh)."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return False
    return argv0 == binary or os.path.basename(argv0) == "droid"


def tree(root: int, binary: str) -> TreeSample:
    """One pass over /proc: droid processes and RSS of ``root`` and its descendants."""
    stats: dict[int, tuple[int, str, int, str]] = {}  # pid -> (ppid, state, rss bytes, start time)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                raw = handle.read().decode(errors="replace")
        except OSError:
            continue
        fields = raw.rsplit(")", 1)[1].split()
        stats[int(entry.name)] = (int(fields[1]), fields[0], int(fields[21]) * PAGE, fields[19])
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, (ppid, *_rest) in stats.items():
        children[ppid].append(pid)
    rss_daemon = stats[root][2] if root in stats and stats[root][1] != "Z" else 0
    total, pids, live, stack = rss_daemon, [], 0, [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            stack.append(child)
            ppid, state, rss, _start = stats[child]
            if state == "Z":
                continue
            total += rss
            live += 1
            if _is_droid(child, binary):
                pids.append((child, ppid, state))
    workers = sum(1 for _, ppid, _ in pids if ppid == root)
    return TreeSample(0.0, workers, total, rss_daemon, tuple(pids), len(pids), live)


class Sampler(threading.Thread):
    """Samples the daemon's process tree every ``interval`` seconds until stopped."""

    def __init__(self, root: int, binary: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.root, self.binary, self.interval = root, binary, interval
        self.samples: list[TreeSample] = []
        self._stop_event = threading.Event()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        next_at = time.perf_counter()
        while not self._stop_event.is_set():
            s = tree(self.root, self.binary)
            self.samples.append(
                TreeSample(time.perf_counter() - self.t0, s.droids, s.rss_total, s.rss_daemon,
                           s.droid_pids, s.droid_images, s.descendants)
            )
            next_at += self.interval
            self._stop_event.wait(max(0.0, next_at - time.perf_counter()))

    def stop(self) -> list[TreeSample]:
        self._stop_event.set()
        self.join(timeout=5)
        return self.samples


# --- statistics ---------------------------------------------------------------------------------


def dist(values: Sequence[float]) -> dict[str, Any]:
    s = sorted(values)
    if not s:
        return {"n": 0, "median": None, "p90": None, "min": None, "max": None}
    return {
        "n": len(s),
        "median": round(statistics.median(s), 2),
        "p90": round(p90(s), 2),
        "min": round(s[0], 2),
        "max": round(s[-1], 2),
    }


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


# --- HTTP ------------------------------------------------------------------------------------------


@dataclass
class TurnResult:
    ok: bool
    status: int
    ttft_ms: float | None
    total_ms: float
    session_id: str
    text: str = ""
    error: str | None = None


async def chat(
    http: aiohttp.ClientSession,
    base: str,
    model: str,
    text: str,
    session_id: str | None = None,
    timeout: float = TURN_TIMEOUT_S,
) -> TurnResult:
    """One streamed chat completion to its end; never raises for a failed request."""
    headers = {"Content-Type": "application/json"}
    if session_id:
        headers["X-Session-Id"] = session_id
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": text}], "stream": True})
    started = time.perf_counter()
    first: float | None = None
    status, sid, parts = 0, "", []

    def result(error: str | None) -> TurnResult:
        ttft = None if first is None else (first - started) * 1000
        total = (time.perf_counter() - started) * 1000
        return TurnResult(error is None, status, ttft, total, sid, "".join(parts), error)

    try:
        async with asyncio.timeout(timeout):
            async with http.post(f"{base}/v1/chat/completions", data=body, headers=headers) as response:
                status = response.status
                sid = response.headers.get("X-Session-Id", "")
                if status != 200:
                    return result(f"HTTP {status}: {(await response.text())[:200]}")
                done = False
                async for raw in response.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    chunk = orjson.loads(data)
                    if "error" in chunk:
                        return result(f"streamed error: {chunk['error']}")
                    for choice in chunk.get("choices", ()):
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            if first is None:
                                first = time.perf_counter()
                            parts.append(piece)
                if not done:
                    return result("stream ended without [DONE]")
                if first is None:
                    return result("no content streamed")
                return result(None)
    except TimeoutError:
        return result(f"no end of turn within {timeout:g} s")
    except (aiohttp.ClientError, ValueError) as exc:
        return result(f"{type(exc).__name__}: {exc}")


async def wait_workers(
    pool: PoolClient, predicate: Callable[[dict[str, int]], bool], timeout: float, what: str
) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        workers = (await pool.readyz())["workers"]
        if predicate(workers):
            return workers
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}: {workers}")
        await asyncio.sleep(0.05)


# --- daemons ---------------------------------------------------------------------------------------


@dataclass
class Run:
    binary: str
    home: Path
    tmp: Path
    out: Path
    llm: FakeLLMProcess
    live: list[Daemon] = field(default_factory=list)  # started, not yet stopped

    def start(self, name: str, pool_section: dict[str, Any]) -> Daemon:
        tmp = self.tmp / name
        tmp.mkdir()
        daemon = start_daemon(
            tmp,
            {
                "droid": {"binary": self.binary, "home": str(self.home), "airgap": True},
                "pool": pool_section,
            },
            ready_timeout=DAEMON_READY_S,
        )
        self.live.append(daemon)
        return daemon

    def stop(self, daemon: Daemon, name: str) -> None:
        try:
            stop_everything(daemon, None)
        finally:
            if daemon in self.live:
                self.live.remove(daemon)
            logs = self.out / "bench_pool_logs"
            logs.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copyfile(daemon.log_path, logs / f"{name}.log")


@contextlib.asynccontextmanager
async def daemon_for(run: Run, name: str, pool_section: dict[str, Any]):  # type: ignore[no-untyped-def]
    print(f"[{name}] starting droidpool {pool_section}", file=sys.stderr, flush=True)
    daemon = run.start(name, pool_section)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            yield daemon, http, PoolClient(http, daemon)
    finally:
        run.stop(daemon, name)


def log_events(daemon: Daemon, start: int = 0, end: int | None = None) -> list[dict[str, Any]]:
    data = daemon.log_path.read_bytes()[start:end]
    out = []
    for line in data.splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            event = orjson.loads(line)
            if isinstance(event, dict):
                out.append(event)
    return out


def log_digest(events: list[dict[str, Any]]) -> dict[str, Any]:
    """What the daemon log says happened: retirements by reason, evictions, failures."""
    retire = collections.Counter(str(e.get("reason")) for e in events if e.get("event") == "pool.retire")
    statuses = collections.Counter(
        str(e.get("status")) for e in events if e.get("event") == "turn"
    )
    problems = collections.Counter(
        str(e.get("event"))
        for e in events
        if e.get("level") in ("warning", "error") or str(e.get("event", "")).startswith("pool.spawn_failed")
    )
    return {
        "retire": dict(retire),
        "evict_at_cap": sum(1 for e in events if e.get("event") == "pool.evict"),
        "spares_started": sum(1 for e in events if e.get("event") == "pool.spare_ready"),
        "completion_status": dict(statuses),
        "warnings_errors": dict(problems),
    }


def log_size(daemon: Daemon) -> int:
    return daemon.log_path.stat().st_size


# --- scenarios ---------------------------------------------------------------------------------------


async def scenario_ttft(run: Run, tag: str) -> dict[str, Any]:
    new_ms: list[float] = []
    follow_ms: list[float] = []
    cold = 0
    errors: list[str] = []
    async with daemon_for(run, "ttft", {"max_workers": 4, "models": [{"id": PACED}], "idle_min": 1}) as (
        daemon, _http, pool,
    ):
        await pool.quiet()
        _, session_id = await pool.timed_turn(f"Start a story, please. {tag}")
        for r in range(TTFT_ROUNDS):
            for kind in (("new", "follow") if r % 2 == 0 else ("follow", "new")):
                try:
                    if kind == "new":
                        warm = await pool.wait_spare()
                        await pool.quiet()
                        await asyncio.sleep(SETTLE_S)
                        ms, _ = await pool.timed_turn(f"New conversation {r} {tag}: tell me something.")
                        if warm:
                            new_ms.append(ms)
                        else:
                            cold += 1
                    else:
                        await pool.quiet()
                        await asyncio.sleep(SETTLE_S)
                        ms, sid = await pool.timed_turn(f"Go on with the story, part {r} {tag}.", session_id)
                        if sid != session_id:
                            raise BenchError(f"follow-up answered by session {sid!r}")
                        follow_ms.append(ms)
                except BenchError as exc:
                    errors.append(f"round {r + 1} {kind}: {exc}")
                    print(f"  [ttft] round {r + 1} {kind} failed: {exc}", file=sys.stderr)
        digest = log_digest(log_events(daemon))
    return {
        "rounds": TTFT_ROUNDS,
        "new_ms": dist(new_ms),
        "followup_ms": dist(follow_ms),
        "new_samples_ms": [round(x, 1) for x in new_ms],
        "followup_samples_ms": [round(x, 1) for x in follow_ms],
        "new_without_spare": cold,
        "errors": errors,
        "log": digest,
    }


async def conversation(
    http: aiohttp.ClientSession, base: str, label: str, turns: int
) -> tuple[float, list[TurnResult]]:
    """One conversation: a new turn then follow-ups by X-Session-Id; (wall ms, turns)."""
    started = time.perf_counter()
    results: list[TurnResult] = []
    sid: str | None = None
    for t in range(turns):
        text = f"{label}: turn {t}, tell me something new." if t else f"{label}: start a story, please."
        res = await chat(http, base, PACED, text, sid)
        results.append(res)
        if not res.ok:
            break
        if sid is not None and res.session_id != sid:
            res.ok, res.error = False, f"answered by session {res.session_id!r}, not {sid!r}"
            break
        sid = res.session_id
    return (time.perf_counter() - started) * 1000, results


async def _raw_conversations(run: Run, n: int, tag: str) -> tuple[float, list[float]]:
    """The same workload on ``n`` raw droid processes, pre-initialized as droidpool's spares are
    (tools disabled, title set): the baseline that shows what droid itself costs."""
    from droidpool.config import ALL_TOOL_IDS

    env = {**os.environ, "HOME": str(run.home), "FACTORY_AIRGAP_ENABLED": "1", "FACTORY_LOG_FILE": "/dev/null"}
    workdir = run.tmp / f"raw-{n}-{tag}"
    workdir.mkdir()
    procs = []
    try:
        for _ in range(n):
            procs.append(await asyncio.create_subprocess_exec(
                run.binary, "exec", "--input-format", "stream-jsonrpc", "--output-format", "stream-jsonrpc",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env, cwd=workdir,
                limit=1 << 24, start_new_session=True))

        async def call(proc: Any, method: str, params: dict[str, Any], until_turn_end: bool = False) -> None:
            request_id = uuid.uuid4().hex
            proc.stdin.write((json.dumps({"jsonrpc": "2.0", "factoryApiVersion": "1.0.0", "type": "request",
                                          "id": request_id, "method": method, "params": params}) + "\n").encode())
            async with asyncio.timeout(120):
                while True:
                    message = json.loads(await proc.stdout.readline())
                    if not until_turn_end and message.get("id") == request_id:
                        return
                    note = message.get("params", {}).get("notification", {})
                    if until_turn_end and note.get("type") == "agent_turn_completed":
                        return

        for proc in procs:
            await call(proc, "droid.initialize_session", {"machineId": "bench", "cwd": str(workdir),
                                                          "modelId": PACED, "disabledToolIds": list(ALL_TOOL_IDS)})
            await call(proc, "droid.rename_session", {"title": "bench"})
        await asyncio.sleep(SETTLE_S + 1)

        async def one(i: int) -> list[float]:
            turns = []
            for t in range(CONC_TURNS):
                began = time.perf_counter()
                await call(procs[i], "droid.add_user_message", {"text": f"raw {i} turn {t} {tag}"}, until_turn_end=True)
                turns.append((time.perf_counter() - began) * 1000)
            return turns

        began = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(n)))
        return (time.perf_counter() - began) * 1000, [statistics.median(r[t] for r in results) for t in range(CONC_TURNS)]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def scenario_concurrency(run: Run, tag: str) -> dict[str, Any]:
    n = CONC_CONVERSATIONS
    pool_section = {"max_workers": 12, "models": [{"id": PACED}], "idle_min": n}
    async with daemon_for(run, "concurrency", pool_section) as (daemon, http, pool):

        async def warm() -> None:
            await wait_workers(
                pool, lambda w: w.get("ready", 0) >= n and not w.get("starting", 0),
                WARM_TIMEOUT_S, f"{n} ready spares",
            )
            await asyncio.sleep(SETTLE_S)

        singles: list[float] = []
        errors: list[str] = []
        for i in range(CONC_SINGLE_RUNS):
            await warm()
            ms, results = await conversation(http, daemon.base_url, f"single {i} {tag}", CONC_TURNS)
            if all(r.ok for r in results) and len(results) == CONC_TURNS:
                singles.append(ms)
            else:
                errors.extend(f"single {i}: {r.error}" for r in results if not r.ok)
        await warm()
        mark = log_size(daemon)
        started = time.perf_counter()
        runs = await asyncio.gather(
            *(conversation(http, daemon.base_url, f"conc {i} {tag}", CONC_TURNS) for i in range(n))
        )
        wall = (time.perf_counter() - started) * 1000
        for i, (_, results) in enumerate(runs):
            errors.extend(f"conversation {i}: {r.error}" for r in results if not r.ok)
        ok = all(len(rs) == CONC_TURNS and all(r.ok for r in rs) for _, rs in runs)
        digest = log_digest(log_events(daemon, mark))
    single = statistics.median(singles) if singles else None
    ratio = wall / single if single else None
    per_turn = [[r.total_ms for r in rs] for _, rs in runs]
    raw_single, _ = await _raw_conversations(run, 1, tag)
    raw_wall, raw_turns = await _raw_conversations(run, n, tag)
    return {
        "raw_single_wall_ms": round(raw_single, 1),
        "raw_concurrent_wall_ms": round(raw_wall, 1),
        "raw_ratio": round(raw_wall / raw_single, 3),
        "raw_turn_median_ms": [round(t, 1) for t in raw_turns],
        "conversations": n,
        "turns": CONC_TURNS,
        "single_wall_ms": [round(x, 1) for x in singles],
        "single_wall_median_ms": None if single is None else round(single, 1),
        "concurrent_wall_ms": round(wall, 1),
        "conversation_wall_ms": dist([w for w, _ in runs]),
        "turn_ms_by_index": [dist([t[i] for t in per_turn if len(t) > i]) for i in range(CONC_TURNS)],
        "followup_ttft_ms": dist([r.ttft_ms for _, rs in runs for r in rs[1:] if r.ttft_ms is not None]),
        "ratio": None if ratio is None else round(ratio, 3),
        "all_ok": ok,
        "errors": errors[:20],
        "log_during_concurrent": digest,
    }


async def scenario_idle_rss(run: Run) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spares in (1, 3):
        name = f"idle_rss_{spares}"
        async with daemon_for(run, name, {"max_workers": 4, "models": [{"id": PACED}], "idle_min": spares}) as (
            daemon, _http, pool,
        ):
            await wait_workers(
                pool, lambda w, s=spares: w.get("ready", 0) >= s and not w.get("starting", 0),
                WARM_TIMEOUT_S, f"{spares} ready spares",
            )
            await asyncio.sleep(3.0)  # let the fresh processes settle
            samples = []
            for _ in range(5):
                samples.append(tree(daemon.process.pid, run.binary))
                await asyncio.sleep(0.2)
            workers = (await pool.readyz())["workers"]
        mid = sorted(samples, key=lambda s: s.rss_total)[len(samples) // 2]
        out[str(spares)] = {
            "spares": spares,
            "droids": mid.droids,
            "total_mb": round(mid.rss_total / MB, 1),
            "daemon_mb": round(mid.rss_daemon / MB, 1),
            "workers_mb": round((mid.rss_total - mid.rss_daemon) / MB, 1),
            "readyz_workers": workers,
        }
    one, three = out["1"], out["3"]
    out["per_extra_spare_mb"] = round((three["total_mb"] - one["total_mb"]) / 2, 1)
    return out


async def scenario_burst(run: Run, tag: str) -> dict[str, Any]:
    pool_section = {
        "max_workers": BURST_CAP, "queue_size": 64, "queue_timeout_s": 120.0,
        "models": [{"id": PACED}], "idle_min": 1,
    }
    async with daemon_for(run, "burst", pool_section) as (daemon, http, pool):
        await pool.quiet()
        await asyncio.sleep(SETTLE_S)
        sampler = Sampler(daemon.process.pid, run.binary, 0.02)
        sampler.start()
        try:
            started = time.perf_counter()
            t_fire = started - sampler.t0
            async with asyncio.timeout(BURST_TIMEOUT_S):
                results = await asyncio.gather(
                    *(chat(http, daemon.base_url, PACED, f"Burst {i} {tag}: tell me something.",
                           timeout=BURST_TIMEOUT_S - 5) for i in range(BURST_N))
                )
            wall = (time.perf_counter() - started) * 1000
            await asyncio.sleep(1.0)  # see the pool settle after the burst
        finally:
            samples = sampler.stop()
        digest = log_digest(log_events(daemon))
    peak = max((s.droids for s in samples), default=0)
    over = [s for s in samples if s.droids > BURST_CAP]
    gaps = [b.t - a.t for a, b in itertools.pairwise(samples)]
    return {
        "n": BURST_N,
        "cap": BURST_CAP,
        "succeeded": sum(1 for r in results if r.ok),
        "all_ok": all(r.ok for r in results),
        "statuses": {str(k): v for k, v in collections.Counter(r.status for r in results).items()},
        "errors": [r.error for r in results if not r.ok][:10],
        "wall_ms": round(wall, 1),
        "latency_ms": dist([r.total_ms for r in results if r.ok]),
        "latencies_s": [round(r.total_ms / 1000, 3) for r in results if r.ok],
        "ttft_ms": dist([r.ttft_ms for r in results if r.ttft_ms is not None]),
        "peak_droids": peak,
        "samples_over_cap": len(over),
        "over_cap_samples": [(round(s.t - t_fire, 3), s.droid_pids) for s in over[:40]],
        "images_over_cap_examples": [
            (round(s.t - t_fire, 3), s.droid_pids) for s in samples if s.droid_images > BURST_CAP
        ][:5],
        "peak_droid_images": max((s.droid_images for s in samples), default=0),
        "samples_images_over_cap": sum(1 for s in samples if s.droid_images > BURST_CAP),
        "peak_descendants": max((s.descendants for s in samples), default=0),
        "n_samples": len(samples),
        "sample_gap_ms": dist([g * 1000 for g in gaps]),
        "series": [(round(s.t - t_fire, 3), s.droids, s.droid_images) for s in samples],
        "log": digest,
    }


async def scenario_rotation(run: Run, tag: str) -> dict[str, Any]:
    pool_section = {
        "max_workers": ROTATION_CAP, "memory_budget_mb": ROTATION_BUDGET_MB,
        "models": [{"id": ECHO}], "idle_min": 1,
    }
    # Only this scenario's requests are checked; start the record afresh (smaller to fetch).
    async with (
        aiohttp.ClientSession() as http,
        http.delete(f"{run.llm.url}/_requests", timeout=aiohttp.ClientTimeout(total=10)) as response,
    ):
        if response.status != 204:
            raise BenchError(f"the fake LLM refused to clear its record: {response.status}")
    r1_text = {i: f"R1-{tag}-{i:03d}: remember the code word {uuid.uuid4().hex[:10]}." for i in range(ROTATION_N)}
    r2_text = {i: f"R2-{tag}-{i:03d}: what was the code word?" for i in range(ROTATION_N)}
    async with daemon_for(run, "rotation", pool_section) as (daemon, http, pool):
        await pool.quiet()
        sampler = Sampler(daemon.process.pid, run.binary, 0.1)
        sampler.start()
        round1: dict[int, TurnResult] = {}
        round2: dict[int, TurnResult] = {}
        try:
            async def do_round(texts: dict[int, str], sessions: dict[int, str] | None,
                               into: dict[int, TurnResult]) -> None:
                queue: asyncio.Queue[int] = asyncio.Queue()
                for i in texts:
                    queue.put_nowait(i)

                async def client() -> None:
                    while not queue.empty():
                        i = queue.get_nowait()
                        sid = None if sessions is None else sessions.get(i)
                        if sessions is not None and not sid:
                            continue  # round 1 failed for it
                        into[i] = await chat(http, daemon.base_url, ECHO, texts[i], sid)

                async with asyncio.timeout(ROUND_TIMEOUT_S):
                    await asyncio.gather(*(client() for _ in range(ROTATION_CONCURRENCY)))

            t1 = time.perf_counter() - sampler.t0
            await do_round(r1_text, None, round1)
            sessions = {i: r.session_id for i, r in round1.items() if r.ok and r.session_id}
            mark = log_size(daemon)
            t2 = time.perf_counter() - sampler.t0
            await do_round(r2_text, sessions, round2)
            t_end = time.perf_counter() - sampler.t0
            await asyncio.sleep(1.0)
        finally:
            samples = sampler.stop()
        events_r1 = log_events(daemon, 0, mark)
        events_r2 = log_events(daemon, mark)
    # Which sessions had lost their worker process before round 2 (evicted/retired per the log).
    stopped_sessions = {
        str(e.get("session")) for e in events_r1
        if e.get("event") in ("pool.retire", "pool.evict") and e.get("session")
    }
    # Context check: the round-2 upstream request of conversation i must carry its round-1 message
    # (the same filter as FakeLLMProcess.answer_requests, applied to one fetch of the record).
    recorded = [r for r in run.llm.requests() if not r["title"]]
    dumped = [orjson.dumps(r["messages"]).decode() for r in recorded]
    kept, lost, missing = [], [], []
    for i in range(ROTATION_N):
        marker = f"R2-{tag}-{i:03d}"
        hits = [d for d in dumped if marker in d]
        if not hits:
            missing.append(i)
        elif all(r1_text[i] in d for d in hits) and round2.get(i) and round2[i].ok \
                and round2[i].session_id == sessions.get(i):
            kept.append(i)
        else:
            lost.append(i)
    resumed_ttft = [round2[i].ttft_ms for i in round2
                    if round2[i].ttft_ms is not None and sessions.get(i) in stopped_sessions]
    hot_ttft = [round2[i].ttft_ms for i in round2
                if round2[i].ttft_ms is not None and sessions.get(i) not in stopped_sessions]
    peak = max(samples, key=lambda s: s.rss_total) if samples else None
    peak_workers = max((s.rss_total - s.rss_daemon for s in samples), default=0)
    return {
        "n": ROTATION_N,
        "cap": ROTATION_CAP,
        "budget_mb": ROTATION_BUDGET_MB,
        "round1_ok": sum(1 for r in round1.values() if r.ok),
        "round2_ok": sum(1 for r in round2.values() if r.ok),
        "round1_s": round(t2 - t1, 1),
        "round2_s": round(t_end - t2, 1),
        "round1_ttft_ms": dist([r.ttft_ms for r in round1.values() if r.ttft_ms is not None]),
        "round2_ttft_ms": dist([r.ttft_ms for r in round2.values() if r.ttft_ms is not None]),
        "resume_evicted_ttft_ms": dist(resumed_ttft),
        "resume_hot_ttft_ms": dist(hot_ttft),
        "sessions_evicted_before_round2": len(stopped_sessions & set(sessions.values())),
        "context_kept": len(kept),
        "context_lost": lost,
        "round2_request_missing": missing,
        "errors": [f"r1 {i}: {r.error}" for i, r in round1.items() if not r.ok][:10]
        + [f"r2 {i}: {r.error}" for i, r in round2.items() if not r.ok][:10],
        "peak_rss_mb": round(peak.rss_total / MB, 1) if peak else None,
        "peak_workers_rss_mb": round(peak_workers / MB, 1),
        "peak_droids": max((s.droids for s in samples), default=0),
        "round_marks_s": [round(t1, 2), round(t2, 2), round(t_end, 2)],
        "series": [(round(s.t, 2), round(s.rss_total / MB, 1), s.droids) for s in samples],
        "log_round1": log_digest(events_r1),
        "log_round2": log_digest(events_r2),
    }


# --- report --------------------------------------------------------------------------------------------


def report(fig: dict[str, Any]) -> tuple[str, list[tuple[str, bool | None]]]:
    lines: list[str] = []
    t, c, m, b, r = (fig.get(k) for k in ("ttft", "concurrency", "idle_rss", "burst", "rotation"))
    w = 44
    lines.append(f"{'figure':<{w}} value")
    lines.append("-" * (w + 40))

    def row(label: str, value: str) -> None:
        lines.append(f"{label:<{w}} {value}")

    if t:
        for key, label in (("new_ms", "TTFT new conversation (warm spare)"), ("followup_ms", "TTFT follow-up (X-Session-Id)")):
            d = t[key]
            row(label, f"median {fmt(d['median'])} ms  p90 {fmt(d['p90'])} ms  (n={d['n']})")
        if t["new_without_spare"]:
            row("  new conversations without a warm spare", str(t["new_without_spare"]))
    if c:
        row(f"1 conversation ({c['turns']} turns), wall", f"{fmt(c['single_wall_median_ms'])} ms (median of {len(c['single_wall_ms'])})")
        row(f"{c['conversations']} concurrent conversations, wall", f"{fmt(c['concurrent_wall_ms'])} ms")
        row("  concurrency ratio", f"{fmt(c['ratio'], '.2f')}  (target <= {CONC_TARGET})")
        row("  same workload, raw droid processes", f"{fmt(c['raw_concurrent_wall_ms'])} / {fmt(c['raw_single_wall_ms'])} ms "
            f"= ratio {fmt(c['raw_ratio'], '.2f')}  (droid alone; per-turn medians {c['raw_turn_median_ms']} ms)")
        row("  droidpool turn medians", str([d['median'] for d in c['turn_ms_by_index']]) + " ms")
        row("  follow-up TTFT under concurrency", f"median {fmt(c['followup_ttft_ms']['median'])} ms  p90 {fmt(c['followup_ttft_ms']['p90'])} ms")
        lc = c["log_during_concurrent"]
        row("  stops during the concurrent run", f"retire {lc['retire'] or '{}'}, evict-at-cap {lc['evict_at_cap']}")
    if m:
        for k in ("1", "3"):
            e = m[k]
            row(f"idle RSS, {k} spare(s) ({e['droids']} droid)", f"{e['total_mb']:.0f} MB  (daemon {e['daemon_mb']:.0f} + workers {e['workers_mb']:.0f})")
        row("  per extra spare", f"{m['per_extra_spare_mb']:.0f} MB")
    if b:
        row(f"burst {b['n']} new, cap {b['cap']}: peak droid workers", f"{b['peak_droids']}  ({b['samples_over_cap']} of {b['n_samples']} samples over cap; sample gap median {fmt(b['sample_gap_ms']['median'], '.1f')} ms)")
        row("  peak droid-image processes incl. helpers", f"{b['peak_droid_images']}  ({b['samples_images_over_cap']} samples > cap: droid's forked sh/rg helpers before exec)")
        row("  succeeded", f"{b['succeeded']}/{b['n']}  statuses {b['statuses']}")
        lat = b["latency_ms"]
        row("  latency (send to [DONE])", f"median {fmt(lat['median'])}  p90 {fmt(lat['p90'])}  min {fmt(lat['min'])}  max {fmt(lat['max'])} ms")
        row("  TTFT", f"median {fmt(b['ttft_ms']['median'])}  p90 {fmt(b['ttft_ms']['p90'])} ms; wall {b['wall_ms'] / 1000:.1f} s")
        row("  stops", f"retire {b['log']['retire'] or '{}'}, evict-at-cap {b['log']['evict_at_cap']}")
    if r:
        row(f"rotation {r['n']} conv, cap {r['cap']}: kept context", f"{r['context_kept']}/{r['n']}  (round 1 ok {r['round1_ok']}, round 2 ok {r['round2_ok']})")
        row("  peak RSS, daemon tree", f"{fmt(r['peak_rss_mb'])} MB (workers only {fmt(r['peak_workers_rss_mb'])} MB) vs budget {r['budget_mb']} MB")
        row("  peak droids", f"{r['peak_droids']} (cap {r['cap']})")
        row("  round 1 TTFT (new)", f"median {fmt(r['round1_ttft_ms']['median'])}  p90 {fmt(r['round1_ttft_ms']['p90'])} ms; {r['round1_s']} s")
        ev = r["resume_evicted_ttft_ms"]
        row(f"  resume TTFT, evicted sessions (n={ev['n']})", f"median {fmt(ev['median'])}  p90 {fmt(ev['p90'])}  max {fmt(ev['max'])} ms")
        hot = r["resume_hot_ttft_ms"]
        row(f"  resume TTFT, worker not stopped (n={hot['n']})", f"median {fmt(hot['median'])}  p90 {fmt(hot['p90'])} ms; round 2 {r['round2_s']} s")
        row("  stops round 1 / round 2", f"{r['log_round1']['retire'] or '{}'} evict-at-cap {r['log_round1']['evict_at_cap']} / {r['log_round2']['retire'] or '{}'} evict-at-cap {r['log_round2']['evict_at_cap']}")

    targets: list[tuple[str, bool | None]] = []
    if c:
        targets.append((f"{c['conversations']}-concurrent ratio <= {CONC_TARGET} ({fmt(c['ratio'], '.2f')})",
                        None if c["ratio"] is None else (c["ratio"] <= CONC_TARGET and c["all_ok"])))
    if b:
        targets.append((f"burst peak <= cap ({b['peak_droids']} <= {b['cap']})", b["peak_droids"] <= b["cap"]))
    if r:
        targets.append((f"rotation all {r['n']} kept context ({r['context_kept']}/{r['n']})", r["context_kept"] == r["n"]))
        targets.append((f"rotation peak RSS within budget (tree {fmt(r['peak_rss_mb'])} MB <= {r['budget_mb']} MB)",
                        None if r["peak_rss_mb"] is None else r["peak_rss_mb"] <= r["budget_mb"]))
    lines.append("")
    for label, met in targets:
        lines.append(f"target: {label} {'met' if met else 'NOT met'}")
    return "\n".join(lines), targets


def plot(fig: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    (a_burst, a_rot, a_ttft), (a_conc, a_lat, a_mem) = axes
    b, r, t, c, m = (fig.get(k) for k in ("burst", "rotation", "ttft", "concurrency", "idle_rss"))
    if b:
        xs = [p[0] for p in b["series"]]
        a_burst.step(xs, [p[2] for p in b["series"]], where="post", color="tab:orange", alpha=0.5,
                     linewidth=0.8, label="droid images incl. forked helpers")
        a_burst.step(xs, [p[1] for p in b["series"]], where="post", color="tab:blue",
                     label="live droid worker processes")
        a_burst.axhline(b["cap"], color="red", linestyle="--", label=f"cap ({b['cap']})")
        a_burst.set(title=f"Burst: {b['n']} new conversations at once (sampled every 20 ms)",
                    xlabel="s since the burst", ylabel="processes", ylim=(0, max(b["cap"], b["peak_droids"], b["peak_droid_images"]) + 1.5))
        a_burst.legend(loc="upper right")
    if r:
        xs = [p[0] for p in r["series"]]
        a_rot.plot(xs, [p[1] for p in r["series"]], label="daemon tree RSS")
        a_rot.axhline(r["budget_mb"], color="red", linestyle="--", label=f"memory budget ({r['budget_mb']} MB)")
        for k, (mark, name) in enumerate(zip(r["round_marks_s"], ("round 1", "round 2", "end"), strict=False)):
            a_rot.axvline(mark, color="grey", linestyle=":")
            a_rot.text(mark, r["budget_mb"] * (0.05 + 0.07 * k), f" {name}", color="grey")
        a_rot.set(title=f"Rotation: {r['n']} conversations through {r['cap']} workers",
                  xlabel="s", ylabel="MB", ylim=(0, max(r["budget_mb"], r["peak_rss_mb"] or 0) * 1.15))
        a_rot.legend(loc="upper right")
    if t:
        labels = ["new (warm spare)", "follow-up"]
        med = [t["new_ms"]["median"] or 0, t["followup_ms"]["median"] or 0]
        hi = [t["new_ms"]["p90"] or 0, t["followup_ms"]["p90"] or 0]
        a_ttft.bar(labels, med, color=["tab:blue", "tab:green"], label="median")
        a_ttft.scatter(labels, hi, color="black", marker="_", s=400, label="p90", zorder=3)
        for i, v in enumerate(med):
            a_ttft.text(i, v, f"{v:.0f} ms", ha="center", va="bottom")
        a_ttft.set(title="Time to first token (droidpool, fake LLM)", ylabel="ms")
        a_ttft.legend()
    if c:
        ratio = c["ratio"] or 0
        a_conc.bar([f"{c['conversations']} concurrent / 1"], [ratio],
                   color="tab:green" if ratio <= CONC_TARGET else "tab:red", width=0.5)
        a_conc.axhline(CONC_TARGET, color="red", linestyle="--", label=f"target {CONC_TARGET}")
        a_conc.axhline(1.0, color="grey", linestyle=":")
        a_conc.text(0, ratio, f"{ratio:.2f}", ha="center", va="bottom")
        a_conc.set(title=f"Concurrency: wall time ratio ({c['turns']}-turn conversations)",
                   ylabel="ratio", ylim=(0, max(ratio, CONC_TARGET) * 1.25))
        a_conc.legend()
    if b:
        lats = b.get("latencies_s") or []
        a_lat.hist(lats, bins=20, color="tab:purple")
        a_lat.set(title=f"Burst: request latency, send to [DONE] ({b['succeeded']}/{b['n']} ok)",
                  xlabel="s", ylabel="requests")
    if m:
        names = ["1 spare", "3 spares"]
        daemon = [m["1"]["daemon_mb"], m["3"]["daemon_mb"]]
        workers = [m["1"]["workers_mb"], m["3"]["workers_mb"]]
        a_mem.bar(names, daemon, label="daemon", color="tab:gray")
        a_mem.bar(names, workers, bottom=daemon, label="droid spares", color="tab:orange")
        for i, (d, wk) in enumerate(zip(daemon, workers, strict=False)):
            a_mem.text(i, d + wk, f"{d + wk:.0f} MB", ha="center", va="bottom")
        a_mem.set(title="Idle RSS: daemon + spares", ylabel="MB")
        a_mem.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --- main ------------------------------------------------------------------------------------------------

SCENARIOS = ("ttft", "concurrency", "idle_rss", "burst", "rotation")


async def run_all(run: Run, only: Sequence[str]) -> dict[str, Any]:
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, main_task.cancel)
    tag = uuid.uuid4().hex[:8]
    figures: dict[str, Any] = {}
    failures: dict[str, str] = {}
    for name in only:
        started = time.perf_counter()
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        try:
            if name == "ttft":
                figures[name] = await scenario_ttft(run, tag)
            elif name == "concurrency":
                figures[name] = await scenario_concurrency(run, tag)
            elif name == "idle_rss":
                figures[name] = await scenario_idle_rss(run)
            elif name == "burst":
                figures[name] = await scenario_burst(run, tag)
            elif name == "rotation":
                figures[name] = await scenario_rotation(run, tag)
        except (BenchError, AssertionError, OSError) as exc:
            failures[name] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"[{name}] FAILED: {failures[name]}", file=sys.stderr, flush=True)
        else:
            figures[name]["elapsed_s"] = round(time.perf_counter() - started, 1)
            print(f"[{name}] done in {figures[name]['elapsed_s']} s", file=sys.stderr, flush=True)
    if failures:
        figures["failures"] = failures
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory (default bench-results/)")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS), help="run only these scenarios")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (state, droid HOME)")
    args = parser.parse_args(argv)
    binary = real_droid_path()
    if binary is None:
        print("the real droid CLI is needed (set DROIDPOOL_TEST_DROID)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="droidpool-bench-pool-"))
    llm: FakeLLMProcess | None = None
    run: Run | None = None
    status = 0
    try:
        llm = FakeLLMProcess()
        home = write_droid_home(tmp / "home", llm.url)
        run = Run(binary, home, tmp, args.out, llm)
        print(f"droid {binary}", file=sys.stderr, flush=True)
        load_before = os.getloadavg()
        figures = asyncio.run(run_all(run, args.only))
        figures["loadavg_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
        figures["total_run_s"] = round(time.perf_counter() - began, 1)
        figures["droid"] = binary
        figures["reduced"] = (
            f"TTFT {TTFT_ROUNDS} rounds each; single-conversation baseline median of {CONC_SINGLE_RUNS}; "
            f"idle RSS median of 5 samples; rotation concurrency {ROTATION_CONCURRENCY}"
        )
        text, targets = report(figures)
        print(f"droidpool pool benchmark (droid {binary}; 2-core budget: {figures['reduced']})")
        print(text)
        for name, why in figures.get("failures", {}).items():
            print(f"scenario {name} FAILED: {why}")
        load = figures["loadavg_before_after"]
        print(f"total run time: {figures['total_run_s']:.0f} s (1-min load average {load[0]} before, {load[1]} after, {os.cpu_count()} CPUs)")
        png = args.out / "bench_pool.png"
        plot(figures, png)
        (args.out / "bench_pool.json").write_bytes(orjson.dumps(figures, option=orjson.OPT_INDENT_2) + b"\n")
        print(f"wrote {png} and {args.out / 'bench_pool.json'}")
        if figures.get("failures") or not all(met for _, met in targets):
            status = 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        status = 130
    except Exception as exc:  # noqa: BLE001 - report, then clean up
        print(f"benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        status = 1
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        try:
            if run is not None:
                for daemon in list(run.live):
                    with contextlib.suppress(Exception):
                        run.stop(daemon, "leftover")
            stop_everything(None, llm)
        finally:
            signal.signal(signal.SIGINT, previous)
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
