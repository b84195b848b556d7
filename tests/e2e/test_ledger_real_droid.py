"""The usage ledger end to end: droidpool → the real droid → the fake LLM, through the openai and
anthropic SDKs. The rows ``droidpool usage`` shows carry exactly the usage each client saw, priced
by the configured multiplier; over budget, the next request is refused before droid is asked."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest
import tomli_w

from tests.conftest import Daemon, FakeLLMProcess, start_daemon, wait_until, write_droid_home

pytestmark = pytest.mark.real_droid
PACED = "custom:fake-paced"
MULTIPLIER = 1.5


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, real_droid: str, fake_llm: FakeLLMProcess) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("ledger")
    home = write_droid_home(tmp / "home", fake_llm.url)
    daemon = start_daemon(
        tmp,
        {
            "droid": {"binary": real_droid, "home": str(home), "airgap": True},
            "pool": {"max_workers": 2, "models": [{"id": PACED}], "idle_min": 1},
            "deadlines": {"first_token_s": 20.0, "turn_s": 60.0},
            "pricing": {"multipliers": {"custom:*": MULTIPLIER}, "usd_per_million": {"custom:*": 2.0}},
        },
        ready_timeout=60,
    )
    yield daemon
    assert daemon.stop() == 0, daemon.log()


def config_path(daemon: Daemon) -> Path:
    return daemon.log_path.parent / "droidpool.toml"


def usage_cli(daemon: Daemon, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "droidpool", "usage", "--config", str(config_path(daemon)),
                           "--json", *args], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def ledger_row(daemon: Daemon, turn_id: str) -> dict:
    db = daemon.log_path.parent / "state" / "sessions.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM turns WHERE turn_id = ?", (turn_id,)).fetchone()
    assert row is not None, turn_id
    return dict(row)


def standard(row: dict) -> float:
    weighted = row["input_tokens"] + row["cache_creation_tokens"] + row["output_tokens"] + 0.1 * row["cache_read_tokens"]
    return MULTIPLIER * weighted


def test_ledger_rows_match_what_each_client_saw_then_a_budget_stops_the_next(
        daemon: Daemon, fake_llm: FakeLLMProcess) -> None:
    tag = uuid.uuid4().hex[:8]
    oai = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    claude = anthropic.Anthropic(base_url=daemon.base_url, api_key="unused", max_retries=0, timeout=60)
    seen: list[tuple[str, int, int, int]] = []  # turn id, prompt tokens, of them cached, output tokens

    history = [{"role": "user", "content": f"first {tag}"}]
    raw = oai.chat.completions.with_raw_response.create(model=PACED, messages=history)  # type: ignore[arg-type]
    reply = raw.parse()
    assert reply.usage is not None
    seen.append((reply.id.removeprefix("chatcmpl-"), reply.usage.prompt_tokens, 0, reply.usage.completion_tokens))
    header = float(raw.headers["X-Droidpool-Standard-Tokens"])
    history += [{"role": "assistant", "content": reply.choices[0].message.content or ""},
                {"role": "user", "content": f"second {tag} [[cached:40]]"}]
    stream = oai.chat.completions.create(model=PACED, messages=history, stream=True,  # type: ignore[arg-type]
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    final = chunks[-1].usage
    assert final is not None and final.prompt_tokens_details is not None
    seen.append((chunks[0].id.removeprefix("chatcmpl-"), final.prompt_tokens, final.prompt_tokens_details.cached_tokens
                 or 0, final.completion_tokens))
    with claude.messages.stream(model=PACED, max_tokens=100,
                                messages=[{"role": "user", "content": f"third {tag}"}]) as messages:
        message = messages.get_final_message()
    u = message.usage
    seen.append((message.id.removeprefix("msg_"), u.input_tokens + (u.cache_read_input_tokens or 0)
                 + (u.cache_creation_input_tokens or 0), u.cache_read_input_tokens or 0, u.output_tokens))
    response = oai.responses.create(model=PACED, input=f"fourth {tag}")
    assert response.usage is not None
    seen.append((response.id.removeprefix("resp_"), response.usage.input_tokens,
                 response.usage.input_tokens_details.cached_tokens, response.usage.output_tokens))

    for turn_id, prompt, cached, output in seen:
        row = ledger_row(daemon, turn_id)
        assert row["input_tokens"] + row["cache_read_tokens"] + row["cache_creation_tokens"] == prompt
        assert (row["cache_read_tokens"], row["output_tokens"]) == (cached, output)
        assert row["standard_tokens"] == pytest.approx(standard(row))
        assert (row["multiplier"], row["cost_source"], row["droid_model"]) == (MULTIPLIER, "config", row["droid_model"])
        assert row["droid_model"].startswith("custom:fake-paced")
        assert row["usd"] == pytest.approx(2.0 * standard(row) / MULTIPLIER / 1e6)
        assert row["factory_credits"] == 0  # BYOK offline: droid reports no credits
    assert seen[1][2] == 40  # droid passed the cache hit through as cacheReadTokens
    assert header == pytest.approx(ledger_row(daemon, seen[0][0])["standard_tokens"])

    report = usage_cli(daemon, "--by", "dialect")
    dialects = {g["dialect"]: g for g in report["groups"]}
    assert dialects["openai"]["turns"] >= 2 and dialects["anthropic"]["turns"] >= 1
    total = sum(standard(ledger_row(daemon, t)) for t, *_ in seen)
    assert report["total"]["standard_tokens"] >= round(total, 3) - 0.01

    # A budget now below the use: after SIGHUP, the next request is refused and droid never sees it.
    config = config_path(daemon)
    sections = __import__("tomllib").loads(config.read_text())
    sections["budgets"] = {"limits": [{"window": "1h", "limit": 1.0}]}
    config.write_text(tomli_w.dumps(sections))
    daemon.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "droidpool.reloaded" in daemon.log(), 10, "the reload")
    before = len(fake_llm.answer_requests(tag))
    with pytest.raises(openai.RateLimitError) as refused:
        oai.chat.completions.create(model=PACED, messages=[{"role": "user", "content": f"fifth {tag}"}])
    assert refused.value.code == "insufficient_quota" and refused.value.response.headers["Retry-After"]
    with pytest.raises(anthropic.RateLimitError):
        claude.messages.create(model=PACED, max_tokens=50, messages=[{"role": "user", "content": f"sixth {tag}"}])
    assert len(fake_llm.answer_requests(tag)) == before
    assert usage_cli(daemon)["budgets"][0]["percent"] > 100
    del sections["budgets"]
    config.write_text(tomli_w.dumps(sections))
    daemon.process.send_signal(signal.SIGHUP)
