"""Time to first token: droidpool next to raw droid, side by side, against the fake LLM.

Run from the repository root::

    python -m tests.benchmarks.bench_ttft [--rounds N] [--json PATH]

Five kinds of request are timed, round-robin within each round so machine noise hits all
of them alike. Time to first token (TTFT) is from just before the request is sent (or the
process spawned) to the first piece of answer text:

1. ``pool_new``: droidpool, a new conversation while a warm spare is ready (streaming HTTP);
2. ``pool_followup``: droidpool, a follow-up turn by ``X-Session-Id`` (only the new message);
3. ``oneshot``: a fresh ``droid exec -o stream-jsonrpc PROMPT`` per request (spawn → first
   ``assistant_text_delta``);
4. ``raw_followup``: a persistent droid JSON-RPC process, initialized and one turn in
   (``droid.add_user_message`` → first ``assistant_text_delta``);
5. ``raw_new``: a pre-initialized droid JSON-RPC process (spawned and
   ``droid.initialize_session`` done ahead), a fresh one per round.

The LLM is the scripted fake (``tests.fakellm``), model ``custom:fake-paced``, whose first
content chunk is sent at once: what is measured is droid's and droidpool's own latency.
Every process started here is stopped and reaped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from droidpool.config import ALL_TOOL_IDS
from droidpool.droid.protocol import encode_request, encode_response
from tests.conftest import (
    Daemon,
    FakeLLMProcess,
    descendants,
    real_droid_path,
    start_daemon,
    write_droid_home,
)

MODEL = "custom:fake-paced"
RPC_ARGS = ("exec", "--input-format", "stream-jsonrpc", "--output-format", "stream-jsonrpc")
MACHINE_ID = "droidpool-bench"

FIRST_TOKEN_TIMEOUT_S = 20.0  # deadline for one measured request's first token
TURN_TIMEOUT_S = 40.0  # deadline for a whole measured request (turn, stream, exit)
SPAWN_TIMEOUT_S = 20.0  # deadline for a raw droid to start and initialize
SPARE_TIMEOUT_S = 30.0  # deadline for droidpool to offer a warm spare
SPARE_STUCK_S = 3.0  # pool at its cap, nothing starting, no spare this long: none will come
STOP_GRACE_S = 3.0

KINDS: tuple[tuple[str, str], ...] = (
    ("pool_new", "droidpool, new conversation (warm spare)"),
    ("pool_followup", "droidpool, follow-up turn"),
    ("oneshot", "fresh one-shot droid exec"),
    ("raw_followup", "raw persistent droid, follow-up turn"),
    ("raw_new", "raw pre-initialized droid, new conversation"),
)
# Not a kind of its own: a new conversation measured when droidpool had no spare to offer.
COLD = ("pool_new_cold", "droidpool, new conversation, NO spare")

# Process groups of every droid started here directly; killed on the way out whatever happens.
_GROUPS: set[int] = set()
# Set on SIGINT: whatever fails afterwards (droidpool and the fake LLM get the Ctrl-C too) is
# reported as an interruption, not as a failure.
_INTERRUPTED = False


class BenchError(RuntimeError):
    pass


# --- statistics ---------------------------------------------------------------------------------


@dataclass
class Series:
    label: str
    samples_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        s = sorted(self.samples_ms)
        return {
            "label": self.label,
            "n": len(s),
            "median_ms": round(statistics.median(s), 2) if s else None,
            "p90_ms": round(p90(s), 2) if s else None,
            "min_ms": round(s[0], 2) if s else None,
            "samples_ms": [round(x, 2) for x in self.samples_ms],
            "errors": self.errors,
        }


def p90(sorted_samples: Sequence[float]) -> float:
    """The 90th percentile, linearly interpolated between the closest ranks."""
    if len(sorted_samples) == 1:
        return sorted_samples[0]
    return statistics.quantiles(sorted_samples, n=10, method="inclusive")[8]


# --- a droid JSON-RPC process, driven directly ---------------------------------------------------


def droid_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DROIDPOOL_")}
    env.update(FACTORY_AIRGAP_ENABLED="1", FACTORY_LOG_FILE="/dev/null", HOME=str(home))
    return env


async def spawn(
    argv: Sequence[str], env: dict[str, str], cwd: Path, stdin: int
) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=cwd,
        env=env,
        start_new_session=True,  # its own group: a stop reaches whatever it started
        limit=32 * 1024 * 1024,
    )
    _GROUPS.add(process.pid)
    return process


async def reap(process: asyncio.subprocess.Process) -> None:
    """Close stdin, wait; then SIGTERM, wait; then SIGKILL the group. Always reaped."""
    try:
        if process.returncode is None and process.stdin is not None:
            with contextlib.suppress(Exception):
                process.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 2.0)
        if process.returncode is None:
            killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), STOP_GRACE_S)
    finally:
        killpg(process.pid, signal.SIGKILL)
        if process.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 5.0)
        if process.returncode is not None:
            _GROUPS.discard(process.pid)


def killpg(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


class RpcDroid:
    """``droid exec --input-format stream-jsonrpc --output-format stream-jsonrpc``, one request at a time."""

    _ids = itertools.count(1)

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        # (arrival time, notification); a None notification marks EOF.
        self.events: asyncio.Queue[tuple[float, dict[str, Any] | None]] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, binary: str, env: dict[str, str], cwd: Path) -> RpcDroid:
        return cls(await spawn((binary, *RPC_ARGS), env, cwd, asyncio.subprocess.PIPE))

    async def initialize(self, cwd: Path) -> str:
        result = await self.call(
            "droid.initialize_session",
            {
                "machineId": MACHINE_ID,
                "cwd": str(cwd),
                "modelId": MODEL,
                "disabledToolIds": list(ALL_TOOL_IDS),
            },
            SPAWN_TIMEOUT_S,
        )
        return str(result.get("sessionId"))

    async def call(self, method: str, params: dict[str, Any], timeout: float) -> dict[str, Any]:
        request_id = f"bench-{next(self._ids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        try:
            await self._write(encode_request(request_id, method, params))
            message = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise BenchError(f"droid did not answer {method} within {timeout:g} s") from None
        finally:
            self.pending.pop(request_id, None)
        if message.get("error"):
            raise BenchError(f"droid refused {method}: {message['error']}")
        return message.get("result") or {}

    async def timed_turn(self, text: str) -> float:
        """Run one turn to its end; milliseconds from add_user_message to the first text delta."""
        while not self.events.empty():
            self.events.get_nowait()
        started = time.perf_counter()
        await self.call("droid.add_user_message", {"text": text}, FIRST_TOKEN_TIMEOUT_S)
        first: float | None = None
        deadline = started + TURN_TIMEOUT_S
        while True:
            limit = (started + FIRST_TOKEN_TIMEOUT_S) if first is None else deadline
            try:
                at, note = await asyncio.wait_for(
                    self.events.get(), max(0.0, limit - time.perf_counter())
                )
            except TimeoutError:
                what = "first text delta" if first is None else "end of the turn"
                raise BenchError(f"no {what} from droid in time") from None
            if note is None:
                raise BenchError(f"droid exited mid-turn (code {self.process.returncode})")
            kind = note.get("type")
            if kind == "assistant_text_delta" and note.get("textDelta") and first is None:
                first = at
            elif kind == "agent_turn_completed":
                if note.get("reason") != "completed":
                    raise BenchError(f"turn ended {note.get('reason')!r}")
                break
        if first is None:
            raise BenchError("the turn completed without any text")
        return (first - started) * 1000

    async def stop(self) -> None:
        try:
            await reap(self.process)
        finally:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.reader

    async def _write(self, data: bytes) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(data)
            await self.process.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise BenchError(f"droid is gone (code {self.process.returncode})") from exc

    async def _read(self) -> None:
        assert self.process.stdout is not None
        try:
            while line := await self.process.stdout.readline():
                at = time.perf_counter()
                try:
                    message = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                kind = message.get("type")
                if kind == "response":
                    future = self.pending.get(str(message.get("id")))
                    if future is not None and not future.done():
                        future.set_result(message)
                elif kind == "notification":
                    note = (message.get("params") or {}).get("notification")
                    if isinstance(note, dict):
                        self.events.put_nowait((at, note))
                elif (
                    kind == "request"
                ):  # permission / ask_user: refuse, as droidpool does by default
                    answer = (
                        {"selectedOption": "cancel"}
                        if message.get("method") == "droid.request_permission"
                        else {"cancelled": True, "answers": []}
                    )
                    with contextlib.suppress(BenchError):
                        await self._write(encode_response(message.get("id"), answer))
        finally:
            self.events.put_nowait((time.perf_counter(), None))
            for future in self.pending.values():
                if not future.done():
                    future.set_result({"error": "droid exited"})


async def oneshot_ttft(binary: str, env: dict[str, str], cwd: Path, prompt: str) -> float:
    """Spawn ``droid exec -o stream-jsonrpc PROMPT``; ms to its first text delta. Runs it to its exit."""
    argv = (binary, "exec", "-o", "stream-jsonrpc", "--cwd", str(cwd), "-m", MODEL, prompt)
    started = time.perf_counter()
    process = await spawn(argv, env, cwd, asyncio.subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        first: float | None = None
        completed = None
        async with asyncio.timeout(TURN_TIMEOUT_S):
            while True:
                limit = FIRST_TOKEN_TIMEOUT_S - (time.perf_counter() - started)
                if first is None and limit <= 0:
                    raise BenchError("no first text delta from one-shot droid in time")
                line = await asyncio.wait_for(
                    process.stdout.readline(), limit if first is None else None
                )
                if not line:
                    break
                at = time.perf_counter()
                try:
                    message = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                note = (message.get("params") or {}).get("notification") or {}
                if (
                    note.get("type") == "assistant_text_delta"
                    and note.get("textDelta")
                    and first is None
                ):
                    first = at
                elif note.get("type") == "agent_turn_completed":
                    completed = note.get("reason")
            code = await process.wait()
        if first is None:
            raise BenchError(f"one-shot droid printed no text (exit {code}, turn {completed!r})")
        if code != 0 or completed != "completed":
            raise BenchError(f"one-shot droid exited {code}, turn {completed!r}")
        return (first - started) * 1000
    except TimeoutError:
        raise BenchError("one-shot droid did not finish in time") from None
    finally:
        await reap(process)


# --- droidpool over HTTP ---------------------------------------------------------------------------


class PoolClient:
    def __init__(self, http: aiohttp.ClientSession, daemon: Daemon) -> None:
        self.http = http
        self.base = daemon.base_url
        self.daemon = daemon

    async def readyz(self) -> dict[str, Any]:
        if self.daemon.process.poll() is not None:
            raise BenchError(f"droidpool exited with {self.daemon.process.returncode}")
        try:
            async with self.http.get(
                f"{self.base}/readyz", timeout=aiohttp.ClientTimeout(total=5)
            ) as response:
                return dict(await response.json(loads=orjson.loads))
        except (aiohttp.ClientError, ValueError) as exc:
            raise BenchError(f"GET /readyz failed: {exc}") from None

    async def quiet(self) -> None:
        """Until droidpool is spawning nothing (a spawn eats a core for ~0.5 s)."""
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while (await self.readyz())["workers"].get("starting", 0):
            if time.monotonic() > deadline:
                raise BenchError(f"droidpool still starting workers after {SPAWN_TIMEOUT_S:g} s")
            await asyncio.sleep(0.02)

    async def wait_spare(self) -> bool:
        """True once a warm spare is ready; False if the pool sits at its cap without one."""
        deadline = time.monotonic() + SPARE_TIMEOUT_S
        stuck_since: float | None = None
        while True:
            body = await self.readyz()
            workers = body["workers"]
            if workers.get("ready", 0) >= 1:
                return True
            live = sum(workers.get(s, 0) for s in ("starting", "ready", "busy", "idle", "stopping"))
            now = time.monotonic()
            if not workers.get("starting", 0) and live >= body.get("max_workers", 0):
                stuck_since = stuck_since or now
                if now - stuck_since > SPARE_STUCK_S:
                    return False
            else:
                stuck_since = None
            if now > deadline:
                raise BenchError(f"no warm spare within {SPARE_TIMEOUT_S:g} s: {body}")
            await asyncio.sleep(0.02)

    async def timed_turn(self, text: str, session_id: str | None = None) -> tuple[float, str]:
        """Stream one chat completion to its end; (ms to the first content delta, x-session-id)."""
        headers = {"Content-Type": "application/json"}
        if session_id:
            headers["X-Session-Id"] = session_id
        body = orjson.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": True}
        )
        first: float | None = None
        try:
            async with asyncio.timeout(TURN_TIMEOUT_S):
                started = time.perf_counter()
                async with self.http.post(
                    f"{self.base}/v1/chat/completions", data=body, headers=headers
                ) as response:
                    if response.status != 200:
                        raise BenchError(
                            f"droidpool answered {response.status}: {(await response.text())[:300]}"
                        )
                    sid = response.headers.get("X-Session-Id", "")
                    async for raw in response.content:
                        at = time.perf_counter()
                        line = raw.strip()
                        if not line.startswith(b"data:"):
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            break
                        chunk = orjson.loads(data)
                        if "error" in chunk:
                            raise BenchError(f"droidpool streamed an error: {chunk['error']}")
                        if first is None and any(
                            (choice.get("delta") or {}).get("content")
                            for choice in chunk.get("choices", ())
                        ):
                            first = at
                            if at - started > FIRST_TOKEN_TIMEOUT_S:
                                raise BenchError("droidpool's first token came too late")
        except TimeoutError:
            raise BenchError("droidpool did not finish the turn in time") from None
        except aiohttp.ClientError as exc:
            raise BenchError(f"chat completion failed: {exc}") from None
        if first is None:
            raise BenchError("droidpool streamed no content")
        return (first - started) * 1000, sid


# --- the run -----------------------------------------------------------------------------------------


@dataclass
class Setup:
    binary: str
    env: dict[str, str]
    tmp: Path
    settle_s: float


async def run_rounds(setup: Setup, daemon: Daemon, rounds: int) -> dict[str, Series]:
    main_task = asyncio.current_task()
    assert main_task is not None

    def on_sigint() -> None:
        global _INTERRUPTED
        _INTERRUPTED = True
        main_task.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, on_sigint)
    series = {key: Series(label) for key, label in (*KINDS, COLD)}
    oneshot_cwd = setup.tmp / "work-oneshot"
    raw_cwd = setup.tmp / "work-raw"
    oneshot_cwd.mkdir()
    raw_cwd.mkdir()
    tag = uuid.uuid4().hex[:8]
    persistent: RpcDroid | None = None
    fresh: RpcDroid | None = None
    async with aiohttp.ClientSession() as http:
        pool = PoolClient(http, daemon)
        try:
            # The conversations the follow-ups continue: one turn already run in each.
            persistent = await RpcDroid.start(setup.binary, setup.env, raw_cwd)
            await persistent.initialize(raw_cwd)
            await persistent.timed_turn(f"Start a story, please. {tag}")
            await pool.quiet()
            _, session_id = await pool.timed_turn(f"Start a story, please. {tag}")
            if not session_id:
                raise BenchError("droidpool sent no X-Session-Id")

            async def pool_new(r: int) -> None:
                warm = await pool.wait_spare()
                await pool.quiet()
                await asyncio.sleep(setup.settle_s)
                ms, _ = await pool.timed_turn(f"New conversation {r} {tag}: tell me something.")
                if not warm:
                    print(
                        f"  round {r + 1}: droidpool offered no warm spare (pool at its cap); "
                        f"measured cold: {ms:.0f} ms",
                        file=sys.stderr,
                    )
                series["pool_new" if warm else COLD[0]].samples_ms.append(ms)

            async def pool_followup(r: int) -> None:
                await pool.quiet()
                await asyncio.sleep(setup.settle_s)
                ms, sid = await pool.timed_turn(
                    f"Go on with the story, part {r} {tag}.", session_id
                )
                if sid != session_id:
                    raise BenchError(f"follow-up answered for session {sid!r}, not {session_id!r}")
                series["pool_followup"].samples_ms.append(ms)

            async def oneshot(r: int) -> None:
                await pool.quiet()
                await asyncio.sleep(setup.settle_s)
                ms = await oneshot_ttft(
                    setup.binary, setup.env, oneshot_cwd, f"One-shot {r} {tag}: tell me something."
                )
                series["oneshot"].samples_ms.append(ms)

            async def raw_followup(r: int) -> None:
                assert persistent is not None
                await pool.quiet()
                await asyncio.sleep(setup.settle_s)
                ms = await persistent.timed_turn(f"Go on with the story, part {r} {tag}.")
                series["raw_followup"].samples_ms.append(ms)

            async def raw_new(r: int) -> None:
                nonlocal fresh
                fresh = await RpcDroid.start(setup.binary, setup.env, raw_cwd)
                try:
                    await fresh.initialize(raw_cwd)
                    await pool.quiet()
                    await asyncio.sleep(setup.settle_s)
                    ms = await fresh.timed_turn(f"New conversation {r} {tag}: tell me something.")
                    series["raw_new"].samples_ms.append(ms)
                finally:
                    await fresh.stop()
                    fresh = None

            measure = {
                "pool_new": pool_new,
                "pool_followup": pool_followup,
                "oneshot": oneshot,
                "raw_followup": raw_followup,
                "raw_new": raw_new,
            }
            keys = [key for key, _ in KINDS]
            for r in range(rounds):
                # Round-robin, starting one kind later each round: no kind always goes first.
                order = keys[r % len(keys) :] + keys[: r % len(keys)]
                for key in order:
                    try:
                        await measure[key](r)
                    except (BenchError, OSError) as exc:
                        if daemon.process.poll() is not None:
                            raise BenchError(
                                f"droidpool exited with {daemon.process.returncode}"
                            ) from None
                        series[key].errors.append(f"round {r + 1}: {exc}")
                        print(f"  round {r + 1}: {key} failed: {exc}", file=sys.stderr)
                print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
        finally:
            for process in (fresh, persistent):
                if process is not None:
                    await process.stop()
    return series


def report(series: dict[str, Series], rounds: int) -> tuple[str, dict[str, Any]]:
    summaries = {key: s.summary() for key, s in series.items()}
    rows = [key for key, _ in KINDS] + ([COLD[0]] if series[COLD[0]].samples_ms else [])
    width = max(len(series[key].label) for key in rows)
    lines = [f"time to first token, ms ({rounds} rounds, model {MODEL})", ""]
    lines.append(f"{'':<{width}}  {'n':>3}  {'median':>8}  {'p90':>8}  {'min':>8}")
    for key in rows:
        s = summaries[key]

        def fmt(value: float | None) -> str:
            return f"{value:8.1f}" if value is not None else f"{'-':>8}"

        errors = f"  ({len(s['errors'])} failed)" if s["errors"] else ""
        lines.append(
            f"{s['label']:<{width}}  {s['n']:>3}  {fmt(s['median_ms'])}  {fmt(s['p90_ms'])}  {fmt(s['min_ms'])}{errors}"
        )
    lines.append("")
    checks: dict[str, Any] = {}
    pool_fu, raw_fu = (
        summaries["pool_followup"]["median_ms"],
        summaries["raw_followup"]["median_ms"],
    )
    if pool_fu is not None and raw_fu is not None:
        delta = pool_fu - raw_fu
        checks["followup_overhead_ms"] = {
            "value": round(delta, 2),
            "target": 30,
            "met": delta <= 30,
        }
        lines.append(
            f"follow-up droidpool - raw persistent: {delta:+.1f} ms (target <= 30 ms)"
            f" {'met' if delta <= 30 else 'MISSED'}"
        )
    else:
        lines.append("follow-up droidpool - raw persistent: no figures (target <= 30 ms) MISSED")
    new = summaries["pool_new"]["median_ms"]
    if new is not None:
        checks["new_conversation_ms"] = {"value": round(new, 2), "target": 250, "met": new <= 250}
        lines.append(
            f"new conversation droidpool: {new:.1f} ms (target <= 250 ms) {'met' if new <= 250 else 'MISSED'}"
        )
    else:
        lines.append("new conversation droidpool: no warm-spare figures (target <= 250 ms) MISSED")
    cold = summaries[COLD[0]]
    if cold["n"]:
        lines.append(
            f"note: {cold['n']} of {rounds} droidpool new conversations found no warm spare "
            "(pool at pool.max_workers with idle session workers; no spare is started then)"
        )
    return "\n".join(lines), {
        "rounds": rounds,
        "model": MODEL,
        "results": summaries,
        "checks": checks,
    }


def stop_everything(daemon: Daemon | None, llm: FakeLLMProcess | None) -> None:
    """Stop and reap all this run started: raw droids, droidpool and its workers, the fake LLM."""
    for pgid in list(_GROUPS):
        killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pgid, 0)
        _GROUPS.discard(pgid)
    if daemon is not None:
        workers = descendants(daemon.process.pid)
        try:
            daemon.stop()
        except AssertionError as exc:
            print(f"warning: {exc}", file=sys.stderr)
        # Belt and braces: no droid worker may outlive droidpool.
        deadline = time.monotonic() + 10
        for pid in workers:
            while _alive_droid(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive_droid(pid):
                print(f"warning: droidpool left worker {pid} behind; killing it", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    if llm is not None:
        llm.stop()


def _alive_droid(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" and b"droid" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rounds", type=int, default=10, help="measurements of each kind (default 10)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    parser.add_argument(
        "--settle",
        type=float,
        default=0.3,
        help="seconds of quiet before each measurement (default 0.3)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (logs, state)"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    binary = real_droid_path()
    if binary is None:
        print("the real droid CLI is needed (set DROIDPOOL_TEST_DROID)", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="droidpool-bench-"))
    llm: FakeLLMProcess | None = None
    daemon: Daemon | None = None
    status = 0
    try:
        llm = FakeLLMProcess()
        home = write_droid_home(tmp / "home", llm.url)
        print(f"droid {binary}\nstarting droidpool ...", file=sys.stderr, flush=True)
        daemon = start_daemon(
            tmp,
            {
                "droid": {"binary": binary, "home": str(home), "airgap": True},
                "pool": {"max_workers": 4, "models": [{"id": MODEL}], "idle_min": 1},
            },
            ready_timeout=60,
        )
        setup = Setup(binary, droid_env(home), tmp, args.settle)
        series = asyncio.run(run_rounds(setup, daemon, args.rounds))
        text, figures = report(series, args.rounds)
        print(text)
        if args.json:
            args.json.write_text(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode() + "\n")
        if any(s.errors for s in series.values()):
            status = 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        status = 130
    except Exception as exc:  # noqa: BLE001 - any failure: report it, then clean up
        if _INTERRUPTED:
            print("interrupted", file=sys.stderr)
            status = 130
        else:
            print(f"benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            if daemon is not None:
                print(f"droidpool log (tail):\n{daemon.log()[-3000:]}", file=sys.stderr)
            status = 1
    finally:
        previous = signal.signal(
            signal.SIGINT, signal.SIG_IGN
        )  # a second Ctrl-C must not skip cleanup
        try:
            stop_everything(daemon, llm)
        finally:
            signal.signal(signal.SIGINT, previous)
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
