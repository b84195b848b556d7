"""Client-defined tools over fake droid workers, which call them through droidpool's MCP endpoint
as droid 0.225.2 does (recorded in tests/fixtures/rpc_client_tools_*.stdout.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import anyio
import openai
import pytest

from droidpool.core.tools import MAX_TOOL_NAME, mcp_name
from tests.unit.harness import MODEL, served
from tests.unit.test_dialects_http import clients
from tests.unit.test_sessions import user_texts

pytestmark = pytest.mark.anyio
WEATHER: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
LONG = "lookup_" + "x" * 80  # longer than fits after droid's prefix
LONG_TOOL: Any = {"type": "function", "function": {"name": LONG, "parameters": {"type": "object"}}}


def ask(city: str, tool: str = "get_weather") -> str:
    return f"weather in {city}? [[call:{tool}:{{\"city\": \"{city}\"}}]]"


async def test_chat_call_then_result_resumes_the_same_droid_turn(tmp_path: Path) -> None:
    async with clients(tmp_path) as (client, _, sdk):
        messages: list[Any] = [{"role": "user", "content": ask("Paris")}]
        raw = await sdk.chat.completions.with_raw_response.create(model=MODEL, messages=messages, tools=[WEATHER])
        first = raw.parse()
        session = raw.headers["x-session-id"]
        assert first.choices[0].finish_reason == "tool_calls"
        assert first.choices[0].message.content == "Let me look."
        (call,) = first.choices[0].message.tool_calls or []
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        messages += [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "Sunny"}]
        raw = await sdk.chat.completions.with_raw_response.create(model=MODEL, messages=messages, tools=[WEATHER])
        second = raw.parse()
        assert raw.headers["x-session-id"] == session
        assert second.choices[0].finish_reason == "stop" and second.choices[0].message.content == "Tool said: Sunny"
        # One droid turn: its usage counts once per request, and the session continues afterwards.
        messages += [second.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "thanks"}]
        raw = await sdk.chat.completions.with_raw_response.create(model=MODEL, messages=messages, tools=[WEATHER])
        assert raw.headers["x-session-id"] == session
        metrics = await (await client.get("/metrics")).text()
        assert 'droidpool_tool_events_total{event="parked"} 1.0' in metrics
        assert 'droidpool_tool_events_total{event="resumed"} 1.0' in metrics
        assert "droidpool_parked_turns 0.0" in metrics


async def test_chat_stream_parallel_calls_long_names_and_error_results(tmp_path: Path) -> None:
    assert len(mcp_name(LONG)) == MAX_TOOL_NAME
    async with clients(tmp_path) as (_, _, sdk):
        text = f"{ask('Oslo')} [[call:{mcp_name(LONG)}:{{\"q\": 1}}]]"
        messages: list[Any] = [{"role": "user", "content": text}]
        calls: dict[int, dict[str, str]] = {}
        chunks = []
        async with await sdk.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, LONG_TOOL],
                                                     stream=True) as stream:
            async for chunk in stream:
                chunks.append(chunk)
                for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                    entry = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                    entry["id"] += delta.id or ""
                    entry["name"] += (delta.function.name or "") if delta.function else ""
                    entry["arguments"] += (delta.function.arguments or "") if delta.function else ""
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        assert [calls[i]["name"] for i in sorted(calls)] == ["get_weather", LONG]  # the client's own names
        assert json.loads(calls[1]["arguments"]) == {"q": 1}
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls.values()]})
        # Results in the other order, one of them an error (the tool message has no error flag in
        # this dialect: an error is just text), with a user note after them.
        messages.append({"role": "tool", "tool_call_id": calls[1]["id"], "content": "no such record"})
        messages.append({"role": "tool", "tool_call_id": calls[0]["id"], "content": "Snow"})
        messages.append({"role": "user", "content": "be quick"})
        second = await sdk.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, LONG_TOOL])
        assert second.choices[0].message.content == "Tool said: Snow | no such record\n\n[The user added: be quick]"


async def test_anthropic_tool_use_blocks_stream_whole_and_results_resume(tmp_path: Path) -> None:
    tools: Any = [{"name": "get_weather", "description": "d", "input_schema": {"type": "object"}}]
    async with clients(tmp_path) as (client, claude, _):
        messages: list[Any] = [{"role": "user", "content": ask("Lima")}]
        async with claude.messages.stream(model=MODEL, max_tokens=64, messages=messages, tools=tools) as stream:
            events = [event async for event in stream]
            first = await stream.get_final_message()
        blocks = [(e.type, e.content_block.type) for e in events if e.type in ("content_block_start", "content_block_stop")]
        assert blocks == [("content_block_start", "text"), ("content_block_stop", "text"),
                          ("content_block_start", "tool_use"), ("content_block_stop", "tool_use")]
        assert first.stop_reason == "tool_use"
        use = first.content[1]
        assert use.type == "tool_use" and use.name == "get_weather" and use.input == {"city": "Lima"}
        messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "is_error": True,
                                                   "content": [{"type": "text", "text": "station offline"}]}]}]
        second = await claude.messages.create(model=MODEL, max_tokens=64, messages=messages, tools=tools)
        assert second.stop_reason == "end_turn"
        # droid reports an MCP error result to its LLM in its own words.
        assert second.content[0].text == ("Tool said: Error: MCP tool droidpool-github___get_weather returned an "
                                          "error: station offline")
        # Non-streaming: text and tool_use blocks in one message.
        body = {"model": MODEL, "max_tokens": 64, "tools": tools,
                "messages": [{"role": "user", "content": ask("Bern")}]}
        response = await client.post("/v1/messages", json=body)
        data = await response.json()
        assert [b["type"] for b in data["content"]] == ["text", "tool_use"] and data["stop_reason"] == "tool_use"


async def test_responses_function_calls_are_stored_and_continue_by_previous_response_id(tmp_path: Path) -> None:
    tools: Any = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}},
                  {"type": "web_search"}]
    async with clients(tmp_path) as (client, _, sdk):
        async with sdk.responses.stream(model=MODEL, tools=tools, input=ask("Baku")) as stream:
            names = [event.type async for event in stream]
            first = await stream.get_final_response()
        assert names.index("response.function_call_arguments.done") < names.index("response.completed")
        assert [i.type for i in first.output] == ["message", "function_call"]
        call = first.output[1]
        assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Baku"}
        stored = await (await client.get(f"/v1/responses/{first.id}")).json()
        assert [i["type"] for i in stored["output"]] == ["message", "function_call"]
        assert stored["output"][1]["call_id"] == call.call_id
        raw = await sdk.responses.with_raw_response.create(
            model=MODEL, tools=tools, previous_response_id=first.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Hail"}])
        assert raw.parse().output_text == "Tool said: Hail"
        assert "tools[web_search]" in raw.headers["x-droidpool-ignored-params"]


async def test_limits_refuse_a_park_in_the_clients_dialect_and_expiry_falls_back(tmp_path: Path) -> None:
    async with clients(tmp_path, **{"tools.max_parked_per_key": 1, "tools.park_timeout_s": 1.0}) as (client, claude, sdk):
        first = await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ask("A")}],
                                                  tools=[WEATHER])
        assert first.choices[0].finish_reason == "tool_calls"
        tools: Any = [{"name": "get_weather", "input_schema": {"type": "object"}}]
        with pytest.raises(anthropic.RateLimitError) as info:
            await claude.messages.create(model=MODEL, max_tokens=64, tools=tools,
                                         messages=[{"role": "user", "content": ask("B")}])
        assert info.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
        assert info.value.response.headers["retry-after"] == "5"
        # The first park expires: its results, when they come, reach droid as a message.
        with anyio.fail_after(10):
            while "droidpool_parked_turns 0.0" not in await (await client.get("/metrics")).text():
                await anyio.sleep(0.1)
        call = (first.choices[0].message.tool_calls or [])[0]
        raw = await sdk.chat.completions.with_raw_response.create(model=MODEL, tools=[WEATHER], messages=[
            {"role": "user", "content": ask("A")}, first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "Cold"}])
        assert raw.parse().choices[0].finish_reason == "stop"
        assert user_texts(tmp_path, raw.headers["x-session-id"])[-1] == f"[tool result for {call.id}]\nCold"
        metrics = await (await client.get("/metrics")).text()
        for event in ("park_refused", "park_expired", "tool_results_fallback"):
            assert f'droidpool_tool_events_total{{event="{event}"}} 1.0' in metrics


async def test_wrong_results_are_refused_and_the_turn_stays_parked(tmp_path: Path) -> None:
    async with clients(tmp_path) as (_, _, sdk):
        messages: list[Any] = [{"role": "user", "content": ask("Rome")}]
        first = await sdk.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
        messages.append(first.choices[0].message.model_dump(exclude_none=True))
        with pytest.raises(openai.BadRequestError) as info:
            await sdk.chat.completions.create(model=MODEL, tools=[WEATHER], messages=[
                *messages, {"role": "tool", "tool_call_id": "call_nope", "content": "x"}])
        assert info.value.body["param"] == "messages"  # type: ignore[index]
        call = (first.choices[0].message.tool_calls or [])[0]
        done = await sdk.chat.completions.create(model=MODEL, tools=[WEATHER], messages=[
            *messages, {"role": "tool", "tool_call_id": call.id, "content": "Warm"}])
        assert done.choices[0].message.content == "Tool said: Warm"


async def test_deleting_a_session_releases_its_parked_turn_and_shutdown_does_not_wait(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with clients(tmp_path) as (client, _, sdk):
            raw = await sdk.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": ask("X")}], tools=[WEATHER])
            session = raw.headers["x-session-id"]
            assert (await client.delete(f"/v1/sessions/{session}")).status == 200
            assert "droidpool_parked_turns 0.0" in await (await client.get("/metrics")).text()
            await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ask("Y")}],
                                              tools=[WEATHER])
            assert "droidpool_parked_turns 1.0" in await (await client.get("/metrics")).text()
        # Leaving with a parked turn interrupts it; nothing waits for its timeout (300 s).


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0]"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"tools": [WEATHER], "parallel_tool_calls": False}, "parallel_tool_calls"),
    ("/v1/chat/completions", {"tools": {"x": 1}}, "tools"),
    ("/v1/messages", {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, None),
    ("/v1/messages", {"tools": [{"name": "t"}]}, None),
    ("/v1/messages", {"tools": [{"name": "t", "input_schema": {}}], "tool_choice": {"type": "any"}}, None),
    ("/v1/messages", {"tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}, None),
    ("/v1/responses", {"tools": [{"type": "function", "name": "t"}], "tool_choice": {"type": "function", "name": "t"}},
     "tool_choice"),
])
async def test_tool_requests_droid_cannot_honour_get_a_400(tmp_path: Path, path: str, body: dict[str, Any],
                                                           param: str | None) -> None:
    async with served(tmp_path) as (client, _):
        base = {"model": MODEL, "max_tokens": 16}
        if path == "/v1/responses":
            base["input"] = "hi"
        else:
            base["messages"] = [{"role": "user", "content": "hi"}]
        response = await client.post(path, json={**base, **body})
        data = await response.json()
        assert response.status == 400, data
        if path == "/v1/messages":
            assert data["type"] == "error" and data["error"]["type"] == "invalid_request_error"
        else:
            assert data["error"]["param"] == param


async def test_tools_turned_off_refuse_requests_with_tools(tmp_path: Path) -> None:
    async with served(tmp_path, **{"tools.enabled": False}) as (client, _):
        response = await client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]})
        assert response.status == 400 and (await response.json())["error"]["param"] == "tools"
        response = await client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert response.status == 200


async def test_the_mcp_endpoint_answers_only_a_sessions_token() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from droidpool.api.mcp import build_mcp_app
    from droidpool.core.model import ToolResult, ToolSpec
    from droidpool.core.tools import ToolBroker

    broker = ToolBroker()
    entry = broker.offer("s1", [ToolSpec("get_weather", "d", {"type": "object"}), ToolSpec(LONG)])
    other = broker.offer("s2", [ToolSpec("other")])
    async with TestClient(TestServer(build_mcp_app(broker))) as client:
        def call(token: str, body: Any) -> Any:
            return client.post("/mcp", json=body, headers={"Authorization": f"Bearer {token}"})

        assert (await call("wrong", {"jsonrpc": "2.0", "id": 1, "method": "tools/list"})).status == 401
        assert (await client.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})).status == 401
        init = await (await call(entry.token, {"jsonrpc": "2.0", "id": 0, "method": "initialize",
                                               "params": {"protocolVersion": "2025-11-25"}})).json()
        assert init["result"]["protocolVersion"] == "2025-11-25"
        assert (await call(entry.token, {"jsonrpc": "2.0", "method": "notifications/initialized"})).status == 202
        listed = await (await call(entry.token, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"})).json()
        assert [t["name"] for t in listed["result"]["tools"]] == ["get_weather", mcp_name(LONG)]
        listed = await (await call(other.token, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"})).json()
        assert [t["name"] for t in listed["result"]["tools"]] == ["other"]
        # A call with no result waiting is an error result, not a hang; a supplied one is served once.
        body = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                "params": {"name": "get_weather", "arguments": {"city": "A"}}}
        missing = await (await call(entry.token, body)).json()
        assert missing["result"]["isError"] is True
        broker.supply("s1", [("get_weather", {"city": "A"}, ToolResult("c1", "Sunny"))])
        served_once = await (await call(entry.token, body)).json()
        assert served_once["result"] == {"content": [{"type": "text", "text": "Sunny"}], "isError": False}
        assert (await (await call(entry.token, body)).json())["result"]["isError"] is True
        unknown = await (await call(entry.token, {"jsonrpc": "2.0", "id": 3, "method": "resources/list"})).json()
        assert unknown["error"]["code"] == -32601
        bad = await client.post("/mcp", data=b"{nope", headers={"Authorization": f"Bearer {entry.token}"})
        assert bad.status == 400 and (await bad.json())["error"]["code"] == -32700
        broker.forget("s1")
        assert (await call(entry.token, {"jsonrpc": "2.0", "id": 1, "method": "ping"})).status == 401


def test_droids_binary_says_which_mcp_servers_skip_toolsearch(tmp_path: Path) -> None:
    from droidpool.core.tools import SERVER_NAME, offered_directly
    from droidpool.droid.launch import deferral_exemptions

    build = tmp_path / "droid"
    build.write_bytes(b"\x7fELF..." + b'var wo=["github","agentbrowser"];function bo(e){return e.toLowerCase()'
                      b'.replace(/[^a-z0-9]/g,"")}function Ro(e){}' + b"\0" * 100)
    assert deferral_exemptions(str(build)) == ("github", "agentbrowser")
    assert offered_directly(("github", "agentbrowser")) is True and "github" in SERVER_NAME
    assert offered_directly(("github",), "droidpool") is False
    assert offered_directly(None) is None
    (tmp_path / "script").write_text("#!/bin/sh\nexec node droid.js \"$@\"\n")
    assert deferral_exemptions(str(tmp_path / "script")) is None
    assert deferral_exemptions(str(tmp_path / "missing")) is None


def test_the_broker_forgets_what_no_live_session_needs() -> None:
    from droidpool.core.model import ToolSpec
    from droidpool.core.tools import ToolBroker

    broker = ToolBroker()
    spec = (ToolSpec("get_weather"),)
    for key in ("live", "expired", "parked", "\0none", "\0new-1"):
        broker.offer(key, spec)
    token = broker.get("expired")
    assert token is not None
    assert broker.retain({"live"}, keep={"parked"}) == 1
    assert broker.get("expired") is None and broker.by_token(token.token) is None  # its MCP token is gone too
    assert all(broker.get(k) is not None for k in ("live", "parked", "\0none", "\0new-1"))
