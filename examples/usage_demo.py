"""A demo ledger for `droidpool usage`: three weeks of made-up turns on three models and three keys.

    python examples/usage_demo.py /tmp/demo
    droidpool usage --config /tmp/demo/droidpool.toml --since 21d --by model --plot usage.png

The rows are synthetic (written through the store's own API, as the daemon writes them), so the
table and the plot show what a busy team's month looks like without spending anything. The
multipliers are droid 0.225.2's live ones; the BYOK model is free at Factory.
"""

from __future__ import annotations

import random
import sys
import time
import uuid
from pathlib import Path

import anyio

from droidpool.core.pricing import Pricing
from droidpool.droid.protocol import Usage
from droidpool.store import SqliteStore, TurnRow

MODELS = {"claude-opus-5": (2.0, 6), "claude-sonnet-5": (0.8, 14), "custom:local-qwen": (0.0, 10)}
CONFIG = """\
[server]
state_dir = "{state}"

[budgets]
# the team's monthly cycle starts on the 5th; each key has its own 5-hour limit
limits = [
  {{window = "monthly:5", limit = 12e6}},
  {{window = "7d", limit = 3e6}},
  {{window = "5h", limit = 4e5, key = "*"}},
]
"""


async def fill(store: SqliteStore, days: int, rng: random.Random) -> int:
    pricing = Pricing({})
    now, written = time.time(), 0
    for day in range(days):
        for model, (multiplier, per_day) in MODELS.items():
            for _ in range(rng.randint(per_day // 2, per_day)):
                usage = Usage(rng.randint(2_000, 20_000), rng.randint(200, 4_000), rng.randint(0, 60_000),
                              rng.randint(0, 3_000))
                price = pricing.price(model, {"id": model, "tokenMultiplier": multiplier} if multiplier else {})
                cost = pricing.cost(price, usage)
                owner, session = rng.choice(["team-a", "team-b", "ci"]), uuid.uuid4().hex
                finished = now - day * 86_400 - rng.random() * 80_000
                await store.create(session, model, owner=owner)
                await store.complete_turn(TurnRow(
                    uuid.uuid4().hex, session, model, usage, finished - 5, owner, droid_model=model,
                    standard_tokens=cost.standard_tokens, multiplier=cost.multiplier, cost_source=cost.source,
                    finished_at=finished), "demo")
                written += 1
    return written


async def main(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "droidpool.toml").write_text(CONFIG.format(state=root / "state"))
    store = SqliteStore(root / "state" / "sessions.db", 86_400 * 30)
    await store.open()
    try:
        print(f"{await fill(store, 21, random.Random(7))} demo turns in {root / 'state' / 'sessions.db'}")
    finally:
        await store.close()


if __name__ == "__main__":
    anyio.run(main, Path(sys.argv[1] if len(sys.argv) > 1 else "demo-ledger"))
