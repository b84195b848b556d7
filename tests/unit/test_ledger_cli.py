"""`droidpool usage`, `prices` and `estimate` on a real store, and a ledger that survives SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import sqlite3
import threading
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner

from droidpool.cli import main
from droidpool.droid.protocol import Usage
from droidpool.store import SqliteStore, TurnRow
from tests.conftest import FAKE_DROID, descendants, start_daemon, wait_until

MODEL = "custom:fake-model"


def write_config(tmp_path: Path, extra: str = "") -> Path:
    config = tmp_path / "droidpool.toml"
    config.write_text(
        f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[droid]\nbinary = "{FAKE_DROID}"\nhome = "{tmp_path / "home"}"\n'
        '[droid.env]\nFAKE_DROID_MODELS = "claude-next,claude-priced"\nFAKE_DROID_MULTIPLIERS = "claude-priced=3"\n'
        f'[pricing]\nmultipliers = {{"{MODEL}" = 2.0}}\n'
        '[budgets]\nlimits = [{window = "30d", limit = 10000}, {window = "5h", limit = 300, key = "a"}]\n' + extra
    )
    (tmp_path / "home").mkdir(exist_ok=True)
    return config


def fill(tmp_path: Path, rows: list[tuple[str, str, Usage, float, float]]) -> None:
    async def go() -> None:
        store = SqliteStore(tmp_path / "state" / "sessions.db", 3600)
        await store.open()
        for owner, model, usage, finished_at, standard in rows:
            session = uuid.uuid4().hex
            await store.create(session, model, owner=owner)
            await store.complete_turn(TurnRow(uuid.uuid4().hex, session, model, usage, finished_at - 1, owner,
                                              droid_model=model, standard_tokens=standard, multiplier=2.0,
                                              cost_source="config", finished_at=finished_at), "h")
        await store.close()

    anyio.run(go)


def run(config: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, [args[0], "--config", str(config), *args[1:]])
    return result.exit_code, result.output


def test_usage_prints_groups_totals_and_budgets_and_plots(tmp_path: Path) -> None:
    import time

    config = write_config(tmp_path)
    now = time.time()
    fill(tmp_path, [("a", MODEL, Usage(100, 50), now - 3600, 300.0), ("b", MODEL, Usage(10, 5), now - 2 * 86400, 30.0),
                    ("a", "claude-priced", Usage(1, 1), now - 40 * 86400, 6.0)])
    code, out = run(config, "usage", "--by", "key", "--json")
    assert code == 0, out
    report = json.loads(out)
    assert {g["key"]: g["standard_tokens"] for g in report["groups"]} == {"a": 300.0, "b": 30.0}  # 30 days
    assert report["total"]["input_tokens"] == 110
    budgets = {(b["applies_to"], b["window"]): b for b in report["budgets"]}
    assert budgets[("service", "30d")]["used"] == 330.0 and budgets[("service", "30d")]["percent"] == 3.3
    assert budgets[("a", "5h")]["used"] == 300.0 and budgets[("a", "5h")]["frees_at"] is not None
    code, out = run(config, "usage", "--since", "60d", "--by", "model")
    assert code == 0, out
    assert "claude-priced" in out and "TOTAL" in out and "Budgets" in out and "frees at" in out
    code, out = run(config, "usage", "--by", "colour")
    assert code != 0 and "colour" in out
    code, out = run(config, "usage", "--since", "yesterday-ish")
    assert code != 0 and "not a time" in out
    plot = tmp_path / "usage.png"
    code, out = run(config, "usage", "--since", "60d", "--plot", str(plot))
    assert code == 0, out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000


def test_prices_show_each_source_and_check_lists_the_unpriced(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    code, out = run(config, "prices", "--json")
    assert code == 0, out
    table = {p["model"]: p for p in json.loads(out)}
    assert (table[MODEL]["multiplier"], table[MODEL]["price_source"]) == (2.0, "config")
    assert (table["claude-priced"]["multiplier"], table["claude-priced"]["price_source"]) == (3.0, "droid")
    assert table["claude-next"]["price_source"] == "unpriced"
    assert table["custom:fake-echo"]["price_source"] == "byok"
    code, out = run(config, "prices", "--check")
    assert code == 1 and "claude-next" in out and "claude-priced" not in out
    code, out = run(config, "prices")
    assert code == 0 and "cache reads count 0.1" in out and "unpriced" in out


def test_estimate_gives_standard_tokens_and_the_share_of_each_budget_left(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    code, out = run(config, "estimate", "claude-priced", "1000", "--json")  # no store yet: budgets untouched
    assert code == 0, out
    estimate = json.loads(out)
    assert estimate["standard_tokens"] == 3000 and estimate["price_source"] == "droid"
    (service,) = [b for b in estimate["budgets"] if b["applies_to"] == "service"]
    assert service["percent_of_remaining"] == 30.0
    code, out = run(config, "estimate", "claude-priced", "4000", "--key", "a")
    assert code == 0 and "would exceed it" in out and "12,000 standard tokens" in out
    code, out = run(config, "estimate", "nope", "10")
    assert code != 0 and "does not exist" in out


def chat(port: int, text: str) -> tuple[int, dict[str, Any]]:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": text}]}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.load(response)


def ledger_rows(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT turn_id, status FROM turns").fetchall()


@pytest.mark.timeout(120)
def test_the_ledger_survives_sigkill_with_no_row_lost_or_doubled(tmp_path: Path) -> None:
    sections = {"droid": {"binary": str(FAKE_DROID), "home": str(tmp_path / "home")},
                "pool": {"models": [{"id": MODEL}], "max_workers": 4, "idle_min": 1},
                "pricing": {"multipliers": {MODEL: 2.0}}}
    (tmp_path / "home").mkdir()
    daemon = start_daemon(tmp_path, sections)
    seen: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        for i in range(50):
            try:
                _, body = chat(daemon.port, f"turn {n}.{i} [[usage:100,10]]" + (" [[slow:40]]" if i % 3 else ""))
            except OSError:
                return  # the daemon is gone
            with lock:
                seen.append(body["id"].removeprefix("chatcmpl-"))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(seen) >= 12, 60, "a dozen turns to complete")
    workers = descendants(daemon.process.pid)
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(timeout=10)
    for thread in threads:
        thread.join(timeout=40)
    db = tmp_path / "state" / "sessions.db"
    rows = ledger_rows(db)
    ids = [turn_id for turn_id, _ in rows]
    assert len(ids) == len(set(ids))  # nothing counted twice
    assert set(seen) <= set(ids)  # every answer a client got is in the ledger
    assert len(ids) - len(seen) <= 3  # at most the turns in flight when it died (recorded, not yet sent)

    again = start_daemon(tmp_path, sections)  # reaps the dead daemon's workers, reads the same store
    try:
        wait_until(lambda: not [p for p in workers if Path(f"/proc/{p}").exists()
                                and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"],
                   20, "the killed daemon's workers to go")
        status, _ = chat(again.port, "after [[usage:100,10]]")
        assert status == 200
        after = ledger_rows(db)
        assert len(after) == len(rows) + 1 and {t for t, _ in rows} < {t for t, _ in after}
        _, report = again.get("/v1/usage")
        assert report["total"]["turns"] == len(after)
        assert report["total"]["standard_tokens"] == pytest.approx(2.0 * 110 * len(after))
    finally:
        assert again.stop() == 0


def test_the_usage_demo_writes_a_ledger_the_readme_shows(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "examples/usage_demo.py", str(tmp_path / "demo")], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).parents[2], check=False)
    assert done.returncode == 0, done.stderr
    written = int(done.stdout.split()[0])
    code, out = run(tmp_path / "demo" / "droidpool.toml", "usage", "--since", "21d", "--by", "model", "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["total"]["turns"] == written
    assert {g["model"] for g in report["groups"]} == {"claude-opus-5", "claude-sonnet-5", "custom:local-qwen"}
    free = next(g for g in report["groups"] if g["model"] == "custom:local-qwen")
    assert free["standard_tokens"] == 0 and free["input_tokens"] > 0
    assert [b["applies_to"] for b in report["budgets"]][:2] == ["service", "service"]
