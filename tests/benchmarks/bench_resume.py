"""Resume cost: a stateless client's follow-up turn when its worker is warm vs evicted vs restarted.

Run from the repository root::

    python -m tests.benchmarks.bench_resume [--rounds N] [--max-workers N]

droidpool runs the real droid CLI against the scripted fake LLM (``custom:fake-echo``, which
answers at once), so what is measured is droidpool's and droid's own latency. Time to first
token (TTFT) is from just before the request is sent to the first piece of answer text, over
streaming HTTP. Each round, side by side:

- ``warm``: a conversation's second turn, resent statelessly while the worker that ran its
  first turn is idle and still holds the session (only ``droid.add_user_message``);
- ``evicted``: a conversation's second turn after enough new conversations came in between
  that the pool stopped the worker that held it (the daemon log's ``pool.evict`` or
  ``pool.retire`` line is waited for): droidpool loads it into another worker with
  ``droid.load_session`` first.

After the rounds the daemon is restarted on the same state directory, and each ``evicted``
conversation's third turn is timed as ``restarted``. Target: evicted within 150 ms of warm.
Every process started here is stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.conftest import Daemon, FakeLLMProcess, real_droid_path, start_daemon, write_droid_home

MODEL = "custom:fake-echo"
TARGET_MS = 150.0
REQUEST_TIMEOUT_S = 60.0


@dataclass
class Conversation:
    tag: str
    messages: list[dict[str, str]] = field(default_factory=list)
    session: str | None = None


async def turn(http: aiohttp.ClientSession, daemon: Daemon, conversation: Conversation, text: str) -> float:
    """Send one stateless turn; its TTFT in ms. The answer joins the conversation."""
    messages = [*conversation.messages, {"role": "user", "content": text}]
    body = {"model": MODEL, "messages": messages, "stream": True}
    started = time.perf_counter()
    first: float | None = None
    answer: list[str] = []
    async with asyncio.timeout(REQUEST_TIMEOUT_S):
        async with http.post(f"{daemon.base_url}/v1/chat/completions", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
            session = response.headers["X-Session-Id"]
            async for line in response.content:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"in-band error: {chunk['error']}")
                delta = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
                if delta:
                    first = first or time.perf_counter()
                    answer.append(delta)
    if first is None:
        raise RuntimeError("no content")
    if conversation.session not in (None, session):
        raise RuntimeError(f"{conversation.tag}: continued {session}, not {conversation.session}")
    conversation.session = session
    conversation.messages = [*messages, {"role": "assistant", "content": "".join(answer)}]
    return (first - started) * 1000


async def settle(http: aiohttp.ClientSession, daemon: Daemon, timeout: float = 30.0) -> None:
    """Wait until no droid is starting: a spawn in the background (a spare being replaced)
    would compete for the CPU with the turn being measured."""
    async with asyncio.timeout(timeout):
        while True:
            async with http.get(f"{daemon.base_url}/readyz") as response:
                workers = (await response.json())["workers"]
            if workers.get("starting", 0) == 0:
                return
            await asyncio.sleep(0.05)


def evicted_sessions(daemon: Daemon) -> set[str]:
    out = set()
    for line in daemon.log().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            # A lease's eviction, or the supervisor's (room for a spare, memory, idle TTL).
            if entry.get("event") in ("pool.evict", "pool.retire") and entry.get("session"):
                out.add(entry["session"])
    return out


def summary(label: str, samples: list[float]) -> str:
    s = sorted(samples)
    p90 = statistics.quantiles(s, n=10, method="inclusive")[8] if len(s) > 1 else s[0]
    return (f"{label:<11} n={len(s):<3} median {statistics.median(s):7.1f} ms   p90 {p90:7.1f} ms   "
            f"min {s[0]:7.1f} ms")


async def rounds(daemon: Daemon, count: int, max_workers: int) -> tuple[list[float], list[float], list[Conversation]]:
    warm: list[float] = []
    evicted: list[float] = []
    resumed: list[Conversation] = []
    async with aiohttp.ClientSession() as http:
        for index in range(count):
            run = uuid.uuid4().hex[:6]
            hot, cold = Conversation(f"warm-{run}"), Conversation(f"evicted-{run}")
            await turn(http, daemon, hot, f"first turn {hot.tag}")
            await settle(http, daemon)
            warm.append(await turn(http, daemon, hot, f"second turn {hot.tag}"))
            await turn(http, daemon, cold, f"first turn {cold.tag}")
            # New conversations until the pool has stopped the worker holding ``cold``.
            for other in range(4 * max_workers):
                if cold.session in evicted_sessions(daemon):
                    break
                await turn(http, daemon, Conversation(f"filler-{run}-{other}"), f"filler {run} {other}")
            else:
                raise RuntimeError(f"round {index}: {cold.session} was never evicted")
            await settle(http, daemon)
            evicted.append(await turn(http, daemon, cold, f"second turn {cold.tag}"))
            resumed.append(cold)
            print(f"round {index + 1}/{count}: warm {warm[-1]:.1f} ms, evicted {evicted[-1]:.1f} ms", flush=True)
    return warm, evicted, resumed


async def after_restart(daemon: Daemon, conversations: list[Conversation]) -> list[float]:
    out = []
    async with aiohttp.ClientSession() as http:
        for conversation in conversations:
            await settle(http, daemon)
            out.append(await turn(http, daemon, conversation, f"third turn {conversation.tag}"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-workers", type=int, default=3)
    args = parser.parse_args()
    binary = real_droid_path()
    if binary is None:
        raise SystemExit("the real droid CLI is needed (set DROIDPOOL_TEST_DROID)")
    tmp = Path(tempfile.mkdtemp(prefix="droidpool-bench-resume-"))
    llm = FakeLLMProcess()
    daemon: Daemon | None = None
    try:
        home = write_droid_home(tmp / "home", llm.url)
        config = {
            "server": {"state_dir": str(tmp / "state"), "log_level": "info"},
            "droid": {"binary": binary, "home": str(home), "airgap": True},
            "pool": {"max_workers": args.max_workers, "models": [{"id": MODEL}], "idle_min": 1},
        }
        for name in ("first", "second"):
            (tmp / name).mkdir()
        daemon = start_daemon(tmp / "first", config, ready_timeout=60)
        print(f"droidpool + droid {binary}, pool.max_workers={args.max_workers}, model {MODEL}", flush=True)
        warm, evicted, resumed = asyncio.run(rounds(daemon, args.rounds, args.max_workers))
        daemon.stop()
        daemon = start_daemon(tmp / "second", config, ready_timeout=60)
        restarted = asyncio.run(after_restart(daemon, resumed))
        daemon.stop()
        daemon = None
        print()
        print("Follow-up turn of a stateless client, time to first token:")
        print(summary("warm", warm))
        print(summary("evicted", evicted))
        print(summary("restarted", restarted))
        gap = statistics.median(evicted) - statistics.median(warm)
        verdict = "within" if gap <= TARGET_MS else "OVER"
        print(f"evicted - warm (medians): {gap:+.1f} ms: {verdict} the {TARGET_MS:g} ms target")
    finally:
        if daemon is not None:
            daemon.stop()
        llm.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
