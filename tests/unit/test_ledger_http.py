"""The ledger through HTTP over fake droid workers: costs on every turn, quotas in every dialect,
unpriced models refused, usage and estimates scoped to the caller's key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from droidpool.core.access import Authenticator, Principal, hash_key
from tests.unit.harness import MODEL, served

pytestmark = pytest.mark.anyio

PRICED = {"pricing.multipliers": {MODEL: 2.0}}
# 100 fresh input, 50 output, 1000 cache read: 2 x (100 + 50 + 0.1 x 1000) = 500 standard tokens
COSTLY = "[[usage:100,50,1000,0,0]]"
FACTORY_MODELS = {"droid.env": {"FAKE_DROID_MODELS": "claude-next,claude-priced",
                                "FAKE_DROID_MULTIPLIERS": "claude-priced=3"}}
KEYS = Authenticator([
    (hash_key("a-secret"), Principal("a")),
    (hash_key("b-secret"), Principal("b", allow_unpriced=True)),
    (hash_key("boss-secret"), Principal("boss", admin=True)),
])


def chat(text: str, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def post(client: TestClient, path: str, body: dict[str, Any], key: str | None = None) -> tuple[int, Any, Any]:
    headers = {**(bearer(key) if key else {}), **({"anthropic-version": "2023-06-01"} if path == "/v1/messages" else {})}
    response = await client.post(path, json=body, headers=headers)
    return response.status, await response.json(), response.headers


def messages(text: str, model: str = MODEL) -> dict[str, Any]:
    return {"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": text}]}


def responses(text: str, model: str = MODEL) -> dict[str, Any]:
    return {"model": model, "input": text}


async def test_every_turn_says_its_standard_tokens_and_the_ledger_matches_the_client(tmp_path: Path) -> None:
    async with served(tmp_path, **PRICED) as (client, _):
        status, body, headers = await post(client, "/v1/chat/completions", chat(f"hello {COSTLY}"))
        assert status == 200, body
        assert headers["X-Droidpool-Standard-Tokens"] == "500" and headers["X-Droidpool-Cost-Source"] == "config"
        assert body["usage"]["prompt_tokens"] == 1100 and body["usage"]["standard_tokens"] == 500
        status, body, headers = await post(client, "/v1/messages", messages(f"again {COSTLY}"))
        assert status == 200 and body["usage"]["standard_tokens"] == 500 and body["usage"]["cache_read_input_tokens"] == 1000
        status, body, _ = await post(client, "/v1/responses", responses(f"third {COSTLY}"))
        assert status == 200 and body["usage"]["standard_tokens"] == 500

        # a stream's headers leave before the turn ends: its final usage carries the figure
        async with client.post("/v1/chat/completions", json=chat(f"stream {COSTLY}", stream=True,
                                                                  stream_options={"include_usage": True})) as r:
            text = await r.text()
        assert "X-Droidpool-Standard-Tokens" not in r.headers
        assert '"standard_tokens":500' in text.replace(" ", "")

        usage = await (await client.get("/v1/usage?by=dialect,model")).json()
        total = usage["total"]
        assert total["turns"] == 4 and total["standard_tokens"] == 2000
        assert (total["input_tokens"], total["output_tokens"], total["cache_read_tokens"]) == (400, 200, 4000)
        dialects = {g["dialect"]: g for g in usage["groups"]}
        assert set(dialects) == {"openai", "anthropic", "responses"} and dialects["openai"]["turns"] == 2
        assert all(g["model"] == MODEL for g in usage["groups"])


async def test_a_failed_turn_whose_usage_droid_reported_is_counted(tmp_path: Path) -> None:
    async with served(tmp_path, **PRICED) as (client, _):
        status, body, _ = await post(client, "/v1/chat/completions", chat(f"fail [[error:401]] {COSTLY}"))
        assert status == 502, body
        usage = await (await client.get("/v1/usage?by=status")).json()
        assert usage["groups"] == [{**usage["groups"][0], "status": "failed", "turns": 1, "standard_tokens": 500}]
        assert usage["total"]["failed_turns"] == 1


async def test_over_budget_every_dialect_gets_insufficient_quota_before_droid_is_asked(tmp_path: Path) -> None:
    log = tmp_path / "droid.log"
    budgets = {"budgets.limits": [{"window": "5h", "limit": 400}], "droid.env": {"FAKE_DROID_LOG": str(log)}}
    async with served(tmp_path, **PRICED, **budgets) as (client, _):
        status, _, _ = await post(client, "/v1/chat/completions", chat(f"spend {COSTLY}"))
        assert status == 200
        asked = log.read_text().count("droid.add_user_message")
        status, body, headers = await post(client, "/v1/chat/completions", chat("more"))
        assert status == 429 and body["error"]["type"] == "insufficient_quota"
        assert body["error"]["code"] == "insufficient_quota" and "5h" in body["error"]["message"]
        assert 5 * 3600 - 120 <= int(headers["Retry-After"]) <= 5 * 3600 + 60
        status, body, headers = await post(client, "/v1/messages", messages("more"))
        assert (status, body["type"], body["error"]["type"]) == (429, "error", "rate_limit_error")
        assert "Retry-After" in headers
        status, body, _ = await post(client, "/v1/responses", responses("more"))
        assert status == 429 and body["error"]["code"] == "insufficient_quota"
        assert log.read_text().count("droid.add_user_message") == asked  # droid saw none of them


async def test_budgets_per_key_hold_each_key_to_its_own(tmp_path: Path) -> None:
    budgets = {"budgets.limits": [{"window": "monthly", "limit": 400, "key": "*"}]}
    async with served(tmp_path, auth=KEYS, **PRICED, **budgets) as (client, _):
        assert (await post(client, "/v1/chat/completions", chat(f"a spends {COSTLY}"), "a-secret"))[0] == 200
        assert (await post(client, "/v1/chat/completions", chat("a again"), "a-secret"))[0] == 429
        assert (await post(client, "/v1/chat/completions", chat("b is fine"), "b-secret"))[0] == 200
        mine = await (await client.get("/v1/usage", headers=bearer("a-secret"))).json()
        assert mine["key"] == "a" and mine["total"]["turns"] == 1
        (budget,) = mine["budgets"]
        assert budget["key"] == "a" and budget["used"] == 500 and budget["percent"] == 125.0
        assert budget["frees_at"] is not None
        refused = await client.get("/v1/usage?key=b", headers=bearer("a-secret"))
        assert refused.status == 403 and (await refused.json())["error"]["code"] == "not_admin"
        everyone = await (await client.get("/v1/usage?by=key", headers=bearer("boss-secret"))).json()
        assert {g["key"]: g["turns"] for g in everyone["groups"]} == {"a": 1, "b": 1}
        assert sorted(b["key"] for b in everyone["budgets"]) == ["a", "b"]


async def test_an_unpriced_factory_model_is_refused_unless_allowed(tmp_path: Path) -> None:
    async with served(tmp_path, auth=KEYS, **FACTORY_MODELS) as (client, _):
        for path, body in (("/v1/chat/completions", chat("hi", "claude-next")),
                           ("/v1/messages", messages("hi", "claude-next")),
                           ("/v1/responses", responses("hi", "claude-next"))):
            status, answer, _ = await post(client, path, body, "a-secret")
            assert status == 403, answer
            error = answer["error"]
            assert error["type"] == "permission_error" and "no known price multiplier" in error["message"]
            if path != "/v1/messages":
                assert error["code"] == "model_unpriced"
        assert (await post(client, "/v1/chat/completions", chat("hi", "claude-next"), "b-secret"))[0] == 200
        status, _, headers = await post(client, "/v1/chat/completions", chat("hi [[usage:10,10]]", "claude-priced"),
                                        "a-secret")
        assert status == 200 and headers["X-Droidpool-Standard-Tokens"] == "60"
        assert headers["X-Droidpool-Cost-Source"] == "droid"
        listed = await (await client.get("/v1/models", headers=bearer("a-secret"))).json()
        ext = {m["id"]: m["droidpool"] for m in listed["data"]}
        assert ext["claude-next"] == {"multiplier": None, "price_source": "unpriced", "allowed": False}
        assert ext["claude-priced"] == {"multiplier": 3.0, "price_source": "droid", "allowed": True}
        assert ext[MODEL]["price_source"] == "byok" and ext[MODEL]["allowed"]
        listed = await (await client.get("/v1/models", headers={**bearer("b-secret"), "anthropic-version": "x"})).json()
        assert {m["id"]: m["droidpool"]["allowed"] for m in listed["data"]}["claude-next"] is True
    (tmp_path / "open").mkdir()
    async with served(tmp_path / "open", **FACTORY_MODELS, **{"pricing.allow_unpriced": True}) as (client, _):
        assert (await post(client, "/v1/chat/completions", chat("hi", "claude-next")))[0] == 200


async def test_estimates_and_warnings(tmp_path: Path) -> None:
    settings = {**PRICED, "budgets.limits": [{"window": "7d", "limit": 1000}], "budgets.warn_at": [0.4, 0.9]}
    async with served(tmp_path, **settings) as (client, _):
        assert (await post(client, "/v1/chat/completions", chat(f"spend {COSTLY}")))[0] == 200
        with capture_logs() as logs:
            assert (await post(client, "/v1/chat/completions", chat("next [[usage:0,0]]")))[0] == 200
            assert (await post(client, "/v1/chat/completions", chat("and next [[usage:0,0]]")))[0] == 200
        warnings = [e for e in logs if e["event"] == "budget.threshold"]
        assert [w["threshold"] for w in warnings] == [0.4]  # once, not on every request
        status, estimate, _ = await post(client, "/v1/usage/estimate", {"model": MODEL, "tokens": 100})
        assert status == 200 and estimate["standard_tokens"] == 200 and estimate["multiplier"] == 2.0
        (budget,) = estimate["budgets"]
        assert budget["percent_of_remaining"] == pytest.approx(100 * 200 / budget["remaining"], abs=0.01)
        status, bad, _ = await post(client, "/v1/usage/estimate", {"model": MODEL, "tokens": "lots"})
        assert status == 400 and bad["error"]["param"] == "tokens"
        status, bad, _ = await post(client, "/v1/usage/estimate", {"model": "nope", "tokens": 1})
        assert status == 404
        bad_by = await client.get("/v1/usage?by=colour")
        assert bad_by.status == 400
        metrics = await (await client.get("/metrics")).text()
        assert f'droidpool_standard_tokens_total{{key="",model="{MODEL}"}} 500.0' in metrics
        assert 'droidpool_budget_warnings_total{threshold="0.4",window="7d"} 1.0' in metrics
        assert 'droidpool_budget_used_ratio{key="",window="7d"} 0.5' in metrics


async def test_an_interrupted_turn_counts_what_droid_reports_after_the_interrupt(tmp_path: Path) -> None:
    import anyio

    async with served(tmp_path, **PRICED) as (client, pool):
        async with client.post("/v1/chat/completions", json=chat(f"hang [[hang_mid]] {COSTLY}", stream=True)) as r:
            await r.content.readany()  # the first delta: then the client goes away
        with anyio.fail_after(10):
            while not (await (await client.get("/v1/usage")).json())["total"]["turns"]:
                await anyio.sleep(0.05)
        usage = await (await client.get("/v1/usage?by=status")).json()
        assert [(g["status"], g["standard_tokens"]) for g in usage["groups"]] == [("failed", 500)]
