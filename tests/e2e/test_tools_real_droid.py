"""Client-defined tools end to end: droidpool → the real droid CLI → the fake LLM that calls them,
through the openai and anthropic SDKs, in all three dialects.

The fake LLM calls a tool when the user text holds ``[[call:NAME:{json}]]``, and answers
``Tool said: …`` with the results it is given; droid runs the calls through droidpool's MCP
endpoint, and droidpool hands them to the client and the client's results back to droid.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import Daemon, FakeLLMProcess, start_daemon, wait_until, write_droid_home

pytestmark = pytest.mark.real_droid
MODEL = "custom:fake-tools"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "description": "The time in a city.",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, real_droid: str, fake_llm: FakeLLMProcess) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("tools")
    home = write_droid_home(tmp / "home", fake_llm.url)
    daemon = start_daemon(
        tmp,
        {
            "droid": {"binary": real_droid, "home": str(home), "airgap": True},
            "pool": {"max_workers": 3, "models": [{"id": MODEL}], "idle_min": 1},
            "deadlines": {"first_token_s": 20.0, "turn_s": 60.0},
            "tools": {"park_timeout_s": 20.0},
        },
        ready_timeout=60,
    )
    yield daemon
    assert daemon.stop() == 0, daemon.log()


@pytest.fixture
def oai(daemon: Daemon) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def tag() -> str:
    return uuid.uuid4().hex[:8]


def llm_requests(fake_llm: FakeLLMProcess, marker: str) -> list[dict[str, Any]]:
    return [r for r in fake_llm.requests() if marker in json.dumps(r.get("messages"))]


def test_chat_tool_round_trip(oai: openai.OpenAI, daemon: Daemon, fake_llm: FakeLLMProcess) -> None:
    # droid 0.225.2's binary exempts our MCP server from ToolSearch: the tools are offered directly.
    assert daemon.get("/readyz")[1]["client_tools"] == {"enabled": True, "offered": "direct", "parked": 0}
    marker = tag()
    messages: list[Any] = [{"role": "user", "content": f"Weather? {marker} [[call:get_weather:{{\"city\": \"Paris\"}}]]"}]
    first = oai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", first
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": f"Sunny, 21 C {marker}"}]
    second = oai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == f"Tool said: Sunny, 21 C {marker}"
    # The upstream saw a genuine tool call and its result, under droid's name for the tool.
    last = llm_requests(fake_llm, marker)[-1]
    roles = [m["role"] for m in last["messages"]]
    assert roles[-2:] == ["assistant", "tool"], roles
    assert last["messages"][-2]["tool_calls"][0]["function"]["name"].endswith("get_weather")


def test_chat_streams_parallel_calls_and_error_results(oai: openai.OpenAI, fake_llm: FakeLLMProcess) -> None:
    marker = tag()
    ask = (f"Both {marker} [[call:get_weather:{{\"city\": \"Oslo\"}}]] [[call:get_time:{{\"city\": \"Oslo\"}}]]")
    messages: list[Any] = [{"role": "user", "content": ask}]
    calls: dict[int, dict[str, str]] = {}
    finish = None
    with oai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME], stream=True) as stream:
        for chunk in stream:
            if not chunk.choices:
                continue
            for delta in chunk.choices[0].delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += delta.id or ""
                entry["name"] += (delta.function.name or "") if delta.function else ""
                entry["arguments"] += (delta.function.arguments or "") if delta.function else ""
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert sorted(c["name"] for c in calls.values()) == ["get_time", "get_weather"]
    assert all(json.loads(c["arguments"]) == {"city": "Oslo"} for c in calls.values())
    by_name = {c["name"]: c for c in calls.values()}
    messages.append({"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in calls.values()]})
    messages.append({"role": "tool", "tool_call_id": by_name["get_weather"]["id"], "content": "Snow"})
    messages.append({"role": "tool", "tool_call_id": by_name["get_time"]["id"], "content": "clock broken"})
    text = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER, TIME], stream=True) if c.choices)
    assert text.startswith("Tool said: ") and "Snow" in text and "clock broken" in text


def test_chat_results_for_the_wrong_calls_are_refused(oai: openai.OpenAI) -> None:
    marker = tag()
    messages: list[Any] = [{"role": "user", "content": f"W {marker} [[call:get_weather:{{\"city\": \"Rome\"}}]]"}]
    first = oai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    message = first.choices[0].message
    messages += [message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": "call_other", "content": "x"}]
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    assert info.value.status_code == 400 and "pending calls" in str(info.value)
    messages[-1]["tool_call_id"] = (message.tool_calls or [])[0].id
    done = oai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    assert done.choices[0].message.content == "Tool said: x"


def metric(daemon: Daemon, name: str, labels: str = "") -> float | None:
    import urllib.request

    with urllib.request.urlopen(daemon.base_url + "/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + ("{" + labels + "}" if labels else " ")):
                return float(line.rsplit(" ", 1)[1])
    return None


def test_a_new_question_instead_of_results_cancels_the_calls(oai: openai.OpenAI, daemon: Daemon) -> None:
    marker = tag()
    messages: list[Any] = [{"role": "user", "content": f"W {marker} [[call:get_weather:{{\"city\": \"Bonn\"}}]]"}]
    raw = oai.chat.completions.with_raw_response.create(model=MODEL, messages=messages, tools=[WEATHER])
    assert raw.parse().choices[0].finish_reason == "tool_calls"
    session = raw.headers["X-Session-Id"]
    again = oai.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": f"Never mind {marker}."}], tools=[WEATHER],
        extra_headers={"X-Session-Id": session})
    assert again.headers["X-Session-Id"] == session
    assert again.parse().choices[0].message.content == "No tool needed."
    assert metric(daemon, "droidpool_parked_turns") == 0  # the calls were cancelled, the worker freed


def test_tool_choice_none_offers_no_tools(oai: openai.OpenAI, fake_llm: FakeLLMProcess) -> None:
    marker = tag()
    messages: list[Any] = [{"role": "user", "content": f"W {marker} [[call:get_weather:{{\"city\": \"Kyiv\"}}]]"}]
    answer = oai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none")
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.content == "No tool needed."
    offered = llm_requests(fake_llm, marker)[-1].get("tools") or []
    assert not any("get_weather" in json.dumps(t) for t in offered)
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required")


def test_anthropic_parallel_tool_use_error_result_and_two_rounds(daemon: Daemon, fake_llm: FakeLLMProcess) -> None:
    tools: Any = [{"name": "get_weather", "description": "The weather in a city.",
                   "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
                  {"name": "get_time", "description": "The time in a city.", "input_schema": {"type": "object"}}]
    marker = tag()
    with anthropic.Anthropic(base_url=daemon.base_url, api_key="unused", max_retries=0, timeout=60) as claude:
        ask = f"W {marker} [[call:get_weather:{{\"city\": \"Lima\"}}]] [[call:get_time:{{\"city\": \"Lima\"}}]]"
        messages: list[Any] = [{"role": "user", "content": ask}]
        with claude.messages.stream(model=MODEL, max_tokens=1024, messages=messages, tools=tools) as stream:
            first = stream.get_final_message()
        assert first.stop_reason == "tool_use"
        uses = {b.name: b for b in first.content if b.type == "tool_use"}
        assert sorted(uses) == ["get_time", "get_weather"] and uses["get_weather"].input == {"city": "Lima"}
        messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                     {"role": "user", "content": [
                         {"type": "tool_result", "tool_use_id": uses["get_weather"].id,
                          "content": [{"type": "text", "text": f"Fog {marker}"}]},
                         {"type": "tool_result", "tool_use_id": uses["get_time"].id, "content": "clock offline",
                          "is_error": True}]}]
        second = claude.messages.create(model=MODEL, max_tokens=1024, messages=messages, tools=tools)
        assert second.stop_reason == "end_turn"
        text = "".join(b.text for b in second.content if b.type == "text")
        assert f"Fog {marker}" in text
        # The error result reached the LLM as an error (droid's words for a failed MCP call).
        upstream = llm_requests(fake_llm, marker)[-1]["messages"]
        errors = [m["content"] for m in upstream if m["role"] == "tool" and "clock offline" in json.dumps(m["content"])]
        assert errors and "returned an error" in json.dumps(errors[0])
        # A second round in the same conversation, by stateless resend.
        messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in second.content]},
                     {"role": "user", "content": f"Again {marker}x [[call:get_weather:{{\"city\": \"Quito\"}}]]"}]
        third = claude.messages.with_raw_response.create(model=MODEL, max_tokens=1024, messages=messages, tools=tools)
        message = third.parse()
        (use,) = [b for b in message.content if b.type == "tool_use"]
        assert use.input == {"city": "Quito"}
        messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in message.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Rain"}]}]
        fourth = claude.messages.with_raw_response.create(model=MODEL, max_tokens=1024, messages=messages, tools=tools)
        assert fourth.headers["x-session-id"] == third.headers["x-session-id"]
        assert "".join(b.text for b in fourth.parse().content if b.type == "text") == "Tool said: Rain"
        # Upstream: genuine call/result pairs for both rounds, not a transcript.
        upstream = llm_requests(fake_llm, marker)[-1]["messages"]
        assert [m["role"] for m in upstream].count("tool") == 3


def test_responses_function_calls_stream_and_previous_response_id(oai: openai.OpenAI) -> None:
    tools: Any = [{"type": "function", "name": "get_weather", "description": "The weather.",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    marker = tag()
    events = []
    with oai.responses.stream(model=MODEL, tools=tools,
                              input=f"W {marker} [[call:get_weather:{{\"city\": \"Baku\"}}]]") as stream:
        for event in stream:
            events.append(event.type)
        first = stream.get_final_response()
    assert "response.function_call_arguments.done" in events
    (call,) = [i for i in first.output if i.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Baku"}
    second = oai.responses.create(model=MODEL, tools=tools, previous_response_id=first.id,
                                  input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Hail"}])
    assert second.output_text == "Tool said: Hail"
    # Two calls at once.
    both = oai.responses.create(model=MODEL, tools=tools, input=(
        f"W {marker}p [[call:get_weather:{{\"city\": \"Ufa\"}}]] [[call:get_weather:{{\"city\": \"Omsk\"}}]]"))
    calls = [i for i in both.output if i.type == "function_call"]
    assert sorted(json.loads(c.arguments)["city"] for c in calls) == ["Omsk", "Ufa"]
    done = oai.responses.create(model=MODEL, tools=tools, previous_response_id=both.id, input=[
        {"type": "function_call_output", "call_id": c.call_id, "output": json.loads(c.arguments)["city"] + " mild"}
        for c in calls])
    assert sorted(done.output_text.removeprefix("Tool said: ").split(" | ")) == ["Omsk mild", "Ufa mild"]
    # Codex style: store false, the whole history resent with the call and its output.
    marker = tag()
    history: list[Any] = [{"type": "message", "role": "user",
                           "content": [{"type": "input_text", "text": f"W {marker} [[call:get_weather:{{\"city\": \"Pune\"}}]]"}]}]
    first = oai.responses.create(model=MODEL, tools=tools, input=history, store=False)
    (call,) = [i for i in first.output if i.type == "function_call"]
    history += [i.model_dump(exclude_none=True) for i in first.output]
    history.append({"type": "function_call_output", "call_id": call.call_id, "output": "Dry"})
    second = oai.responses.create(model=MODEL, tools=tools, input=history, store=False)
    assert second.output_text == "Tool said: Dry"


def test_results_after_the_park_expired_go_to_droid_as_a_message(
    tmp_path_factory: pytest.TempPathFactory, real_droid: str, fake_llm: FakeLLMProcess
) -> None:
    tmp = tmp_path_factory.mktemp("tools-expiry")
    home = write_droid_home(tmp / "home", fake_llm.url)
    daemon = start_daemon(tmp, {
        "droid": {"binary": real_droid, "home": str(home), "airgap": True},
        "pool": {"max_workers": 2, "models": [{"id": MODEL}], "idle_min": 1},
        "tools": {"park_timeout_s": 0.5},
    }, ready_timeout=60)
    try:
        with openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="unused", max_retries=0, timeout=60) as oai:
            marker = tag()
            messages: list[Any] = [{"role": "user", "content": f"W {marker} [[call:get_weather:{{\"city\": \"Riga\"}}]]"}]
            first = oai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
            call = (first.choices[0].message.tool_calls or [])[0]
            wait_until(lambda: "turn.park_expired" in daemon.log(), 10, "the parked turn to expire")
            messages += [first.choices[0].message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": f"Cold {marker}"}]
            late = oai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
            assert late.choices[0].finish_reason == "stop"
            # droid's turn was interrupted: the result reaches it as a message, clearly marked.
            last = llm_requests(fake_llm, marker)[-1]["messages"][-1]
            assert last["role"] == "user" and f"Cold {marker}" in json.dumps(last["content"]), last
            assert metric(daemon, "droidpool_tool_events_total", 'event="park_expired"') == 1
            assert metric(daemon, "droidpool_tool_events_total", 'event="tool_results_fallback"') == 1
            assert metric(daemon, "droidpool_parked_turns") == 0
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_results_sent_after_a_daemon_restart_continue_the_session(
    tmp_path_factory: pytest.TempPathFactory, real_droid: str, fake_llm: FakeLLMProcess
) -> None:
    tmp = tmp_path_factory.mktemp("tools-restart")
    home = write_droid_home(tmp / "home", fake_llm.url)
    sections: dict[str, Any] = {"droid": {"binary": real_droid, "home": str(home), "airgap": True},
                                "pool": {"max_workers": 2, "models": [{"id": MODEL}], "idle_min": 1}}
    marker = tag()
    messages: list[Any] = [{"role": "user", "content": f"W {marker} [[call:get_weather:{{\"city\": \"Nice\"}}]]"}]
    daemon = start_daemon(tmp, sections, ready_timeout=60)
    try:
        with openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="unused", max_retries=0, timeout=60) as oai:
            raw = oai.chat.completions.with_raw_response.create(model=MODEL, messages=messages, tools=[WEATHER])
            first = raw.parse()
    finally:
        assert daemon.stop() == 0, daemon.log()  # the parked turn does not hold up the shutdown
    call = (first.choices[0].message.tool_calls or [])[0]
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": f"Mild {marker}"}]
    daemon = start_daemon(tmp, sections, ready_timeout=60)
    try:
        with openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="unused", max_retries=0, timeout=60) as oai:
            after = oai.chat.completions.with_raw_response.create(model=MODEL, messages=messages, tools=[WEATHER])
            assert after.headers["x-session-id"] == raw.headers["x-session-id"]
            assert after.parse().choices[0].finish_reason == "stop"
        last = llm_requests(fake_llm, marker)[-1]["messages"][-1]
        assert last["role"] == "user" and f"Mild {marker}" in json.dumps(last["content"])
        assert "turn.tool_results_fallback" in daemon.log()
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_the_tool_loop_example_works_as_documented(daemon: Daemon, tmp_path: Any) -> None:
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "notes.txt").write_text("one two three four\n")
    script = Path(__file__).parents[2] / "examples" / "tool_loop.py"
    prompt = 'How long is notes.txt? [[call:word_count:{"path": "notes.txt"}]]'
    result = subprocess.run([sys.executable, str(script), "--model", MODEL, prompt], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "DROIDPOOL_URL": daemon.base_url},
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Tool said: 4", (result.stdout, result.stderr)
    assert '[word_count({"path":"notes.txt"}) -> 4]' in result.stderr
