"""Several nodes: a forwarded follow-up and a takeover follow-up against a local one, side by side.

Run from the repository root::

    python -m tests.benchmarks.bench_nodes [--rounds N]

A PostgreSQL server (Debian's package, started here on a loopback port), the fake LLM, and two
droidpool nodes, each with its own real droid and droid HOME. Times to first token of streamed
Chat Completions follow-ups (stateless resend, ``custom:fake-echo``, which answers at once):

1. ``local`` and ``forwarded``: each round starts a conversation on node A, then times one
   follow-up sent to A and one sent to B (which forwards it to A), in alternating order.
   Target: forwarded within 10 ms of local.
2. ``takeover``: ``--rounds`` conversations on A, then A is SIGKILLed; each conversation's next
   turn, sent to B, takes its session over (droid's files restored from the store, then
   ``load_session``); the turn after that on B is ``local after takeover``. Target: takeover
   within 300 ms of local.
3. The bytes of droid's session files stored per turn.

Every process started here is stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import tempfile
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from tests.benchmarks.bench_dialects import chat_text, settle, stream
from tests.benchmarks.bench_resume import summary
from tests.conftest import Daemon, FakeLLMProcess, free_port, real_droid_path, start_daemon, write_droid_home
from tests.pgserver import PostgresServer

MODEL = "custom:fake-echo"
SECRET = "benchmark-node-secret-0123456789"


def node(tmp: Path, name: str, url: str, binary: str, llm: FakeLLMProcess) -> Daemon:
    root = tmp / name
    home = write_droid_home(root / "home", llm.url)
    port = free_port()
    return start_daemon(root, {
        "server": {"port": port},
        "droid": {"binary": binary, "home": str(home), "airgap": True},
        "pool": {"models": [{"id": MODEL}], "max_workers": 4, "idle_min": 1},
        "nodes": {"url": f"http://127.0.0.1:{port}", "id": name, "heartbeat_s": 1.0, "dead_after_s": 5.0},
    }, ready_timeout=60, env={"DROIDPOOL_STORE_URL": json.dumps(url), "DROIDPOOL_NODES_SECRET": json.dumps(SECRET)})


async def turn(http: aiohttp.ClientSession, daemon: Daemon, history: list[dict[str, Any]], text: str) -> float:
    history.append({"role": "user", "content": text})
    await settle(http, daemon.base_url)
    ms, answer, _ = await stream(http, f"{daemon.base_url}/v1/chat/completions",
                                 {"model": MODEL, "messages": history, "stream": True}, chat_text)
    history.append({"role": "assistant", "content": answer})
    return ms


async def side_by_side(a: Daemon, b: Daemon, rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"local": [], "forwarded": []}
    async with aiohttp.ClientSession() as http:
        for i in range(rounds + 1):
            history: list[dict[str, Any]] = []
            await turn(http, a, history, f"start {uuid.uuid4().hex[:8]}")
            order = [("local", a), ("forwarded", b)] if i % 2 else [("forwarded", b), ("local", a)]
            for name, daemon in order:
                ms = await turn(http, daemon, history, f"{name} {i}")
                if i:  # one warm-up round
                    out[name].append(ms)
    return out


async def conversations(a: Daemon, count: int) -> list[list[dict[str, Any]]]:
    out = []
    async with aiohttp.ClientSession() as http:
        for _ in range(count):
            history: list[dict[str, Any]] = []
            await turn(http, a, history, f"start {uuid.uuid4().hex[:8]}")
            await turn(http, a, history, "a second turn")
            out.append(history)
    return out


async def after_death(b: Daemon, histories: list[list[dict[str, Any]]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"takeover": [], "local after takeover": []}
    async with aiohttp.ClientSession() as http:
        for history in histories:
            out["takeover"].append(await turn(http, b, history, "after the death"))
            out["local after takeover"].append(await turn(http, b, history, "and again"))
    return out


def stored_bytes(url: str) -> list[tuple[int, int]]:
    """(bytes stored, turns) per session."""
    import asyncpg

    async def query() -> list[tuple[int, int]]:
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch("SELECT s.turns, COALESCE(SUM(length(f.data)), 0) FROM sessions s "
                                    "LEFT JOIN session_files f ON f.session_id = s.session_id GROUP BY s.session_id, s.turns")
            return [(int(r[1]), int(r[0])) for r in rows if r[0]]
        finally:
            await conn.close()

    return asyncio.run(query())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    binary = real_droid_path()
    if binary is None:
        raise SystemExit("the real droid CLI is needed (set DROIDPOOL_TEST_DROID)")
    tmp = Path(tempfile.mkdtemp(prefix="droidpool-bench-nodes-"))
    server = PostgresServer().start()
    llm = FakeLLMProcess()
    nodes: list[Daemon] = []
    try:
        url = server.database()
        a, b = node(tmp, "a", url, binary, llm), node(tmp, "b", url, binary, llm)
        nodes += [a, b]
        print(f"2 nodes on PostgreSQL, real droid {binary}, model {MODEL}, {args.rounds} rounds", flush=True)
        samples = asyncio.run(side_by_side(a, b, args.rounds))
        histories = asyncio.run(conversations(a, args.rounds))
        a.process.send_signal(signal.SIGKILL)
        a.process.wait(timeout=10)
        samples.update(asyncio.run(after_death(b, histories)))
        print("\nFollow-up, time to first token:")
        for name, values in samples.items():
            print(summary(name, values))
        gap = statistics.median(samples["forwarded"]) - statistics.median(samples["local"])
        print(f"forwarded - local (medians): {gap:+.1f} ms: {'within' if gap <= 10 else 'OVER'} the 10 ms target")
        gap = statistics.median(samples["takeover"]) - statistics.median(samples["local after takeover"])
        print(f"takeover - local (medians): {gap:+.1f} ms: {'within' if gap <= 300 else 'OVER'} the 300 ms target")
        sizes = stored_bytes(url)
        per_turn = [size / turns for size, turns in sizes]
        print(f"\ndroid's session files stored: {sum(s for s, _ in sizes):,} bytes for {len(sizes)} sessions; "
              f"per turn median {statistics.median(per_turn):,.0f} bytes (max {max(per_turn):,.0f})")
    finally:
        for daemon in nodes:
            if daemon.process.poll() is None:
                daemon.stop()
        llm.stop()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
