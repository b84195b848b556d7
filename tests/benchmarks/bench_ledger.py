"""What the usage ledger costs: the budget check before each turn, side by side in one run.

Run from the repository root::

    python -m tests.benchmarks.bench_ledger [--rounds N] [--rows N]

1. ``admit``: the check a request goes through before droid is asked (three budgets: 5 h per key,
   7 d for the service, a monthly cycle), in process, on stores of 1,000 to ``--rows`` ledger rows
   spread over 30 days; and ``droidpool usage``'s report (by model) on the largest.
2. ``ttft``: two droidpools on the real droid and the fake LLM, one with no budgets on an empty
   store, one with those three budgets on a store of ``--rows`` rows; a new conversation's time to
   first token on each, alternating, ``--rounds`` times. Target: within 5 ms of each other.

Every process started here is stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import anyio

from droidpool.config import Budget
from droidpool.core.catalog import Catalog
from droidpool.core.ledger import Ledger
from droidpool.core.pricing import Pricing
from droidpool.store import SqliteStore
from tests.benchmarks.bench_dialects import chat_text, settle, stream
from tests.benchmarks.bench_resume import summary
from tests.conftest import Daemon, FakeLLMProcess, real_droid_path, start_daemon, write_droid_home

MODEL = "custom:fake-echo"
BUDGETS = (Budget("5h", 5e6, key="*"), Budget("7d", 1e8), Budget("monthly", 1e9))
TARGET_MS = 5.0


def fill(path: Path, rows: int, keys: int = 20) -> None:
    """``rows`` ledger rows over the last 30 days (written in bulk, as a busy month would leave them)."""
    anyio.run(_migrate, path)
    now = time.time()
    rng = random.Random(1)
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO turns (turn_id, session_id, owner, model, dialect, status, started_at, finished_at, "
            "input_tokens, output_tokens, droid_model, standard_tokens, cost_source, multiplier) "
            "VALUES (?, ?, ?, ?, 'openai', 'completed', ?, ?, ?, ?, ?, ?, 'config', 1.0)",
            [(uuid.uuid4().hex, uuid.uuid4().hex, f"key-{rng.randrange(keys)}", MODEL, t - 1, t, 2000, 300, MODEL,
              2300.0) for t in (now - rng.random() * 30 * 86400 for _ in range(rows))])


async def _migrate(path: Path) -> None:
    store = SqliteStore(path, 86400)
    await store.open()
    await store.close()


async def admit_ms(path: Path, rounds: int) -> tuple[list[float], list[float]]:
    store = SqliteStore(path, 86400)
    await store.open()
    try:
        ledger = Ledger(store, Catalog(list), Pricing({}), BUDGETS)
        checks, reports = [], []
        for i in range(rounds):
            started = time.perf_counter()
            await ledger.admit(f"key-{i % 20}")
            checks.append((time.perf_counter() - started) * 1000)
        for _ in range(5):
            started = time.perf_counter()
            await ledger.report(time.time() - 30 * 86400, float("inf"), None, ("model",))
            reports.append((time.perf_counter() - started) * 1000)
        return checks, reports
    finally:
        await store.close()


async def ttft_rounds(plain: Daemon, budgeted: Daemon, rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"no budgets, empty store": [], "3 budgets, full store": []}
    async with aiohttp.ClientSession() as http:
        for i in range(rounds + 2):
            order = [("no budgets, empty store", plain), ("3 budgets, full store", budgeted)]
            for name, daemon in order if i % 2 else reversed(order):
                await settle(http, daemon.base_url)
                body = {"model": MODEL, "stream": True,
                        "messages": [{"role": "user", "content": f"hello {uuid.uuid4().hex[:8]}"}]}
                ms, _, _ = await stream(http, f"{daemon.base_url}/v1/chat/completions", body, chat_text)
                if i >= 2:  # two warm-up rounds
                    out[name].append(ms)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="droidpool-bench-ledger-"))
    llm: FakeLLMProcess | None = None
    daemons: list[Daemon] = []
    try:
        print("Budget check before a turn (3 budgets), in process:")
        for rows in sorted({1000, 10_000, args.rows}):
            path = tmp / f"ledger-{rows}.db"
            fill(path, rows)
            checks, reports = anyio.run(admit_ms, path, 200)
            print(summary(f"admit, {rows:,} rows", checks))
            if rows == args.rows:
                print(summary(f"usage report by model, {rows:,} rows", reports))
        binary = real_droid_path()
        if binary is None:
            print("\n(no real droid: set DROIDPOOL_TEST_DROID for the time-to-first-token comparison)")
            return
        llm = FakeLLMProcess()
        home = write_droid_home(tmp / "home", llm.url)
        for name, budgets in (("plain", ()), ("budgeted", BUDGETS)):
            state = tmp / name / "state"
            state.mkdir(parents=True)
            if budgets:
                fill(state / "sessions.db", args.rows)
            daemons.append(start_daemon(tmp / name, {
                "droid": {"binary": binary, "home": str(home), "airgap": True},
                "pool": {"max_workers": 3, "models": [{"id": MODEL}], "idle_min": 1},
                "budgets": {"limits": [{"window": b.window, "limit": b.limit, "key": b.key} for b in budgets]},
            }, ready_timeout=60))
        print(f"\nNew conversation, time to first token (real droid, {args.rounds} rounds, alternating):")
        samples = asyncio.run(ttft_rounds(daemons[0], daemons[1], args.rounds))
        for name, values in samples.items():
            print(summary(name, values))
        a, b = (statistics.median(v) for v in samples.values())
        verdict = "within" if abs(b - a) <= TARGET_MS else "OVER"
        print(f"budgeted - plain (medians): {b - a:+.1f} ms: {verdict} the {TARGET_MS:g} ms target")
    finally:
        for daemon in daemons:
            daemon.stop()
        if llm is not None:
            llm.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
