"""Each wire dialect's parse and encoder, over droid event streams recorded from the real droid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict

from droidpool import errors
from droidpool.api import anthropic, openai_chat, responses
from droidpool.api.dialect import Dialect, Event, Parsed
from droidpool.core.model import TextOut, ToolCall, ToolResult, TurnRequest, TurnResult
from droidpool.core.output import Accumulator
from droidpool.droid.protocol import Notification, TurnEvent, Usage, parse_line, turn_event

FIXTURES = Path(__file__).parents[1] / "fixtures"
DIALECTS = [openai_chat.DIALECT, anthropic.DIALECT, responses.DIALECT]


def recorded(name: str) -> list[TurnEvent]:
    """The turn events of a real droid's stdout recording."""
    events = []
    for line in (FIXTURES / name).read_bytes().splitlines():
        message = parse_line(line)
        if isinstance(message, Notification) and (event := turn_event(message)) is not None:
            events.append(event)
    return events


class FakeTurn:
    turn_id = "0" * 32
    created = 1700000000

    def __init__(self, request: TurnRequest) -> None:
        self.request = request


def replay(dialect: Dialect, body: dict[str, Any], events: list[TurnEvent]) -> tuple[list[Event], Accumulator]:
    """Stream ``events`` through the dialect as the turn handler does; failures go in-band."""
    parsed = dialect.parse(body, {})
    encoder = dialect.encoder(FakeTurn(parsed.turn), parsed)  # type: ignore[arg-type]
    acc = Accumulator()
    out = list(encoder.start())
    for event in events:
        for output in acc.feed(event):
            out += encoder.feed(output)
    failure = acc.failure()
    if failure is not None:
        out += encoder.failed(failure)
    else:
        out += encoder.finish(result(acc, parsed))
    return out, acc


def result(acc: Accumulator, parsed: Parsed) -> TurnResult:
    return TurnResult("0" * 32, "s", parsed.turn.model, acc.text, acc.reasoning, acc.usage, 1700000000)


BODIES = {
    "openai": {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    "anthropic": {"model": "m", "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    "responses": {"model": "m", "stream": True, "input": "hi"},
}


def streamed_text(dialect: str, events: list[Event]) -> str:
    payloads = [e.data for e in events if isinstance(e.data, dict)]
    if dialect == "openai":
        return "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads if p.get("choices"))
    if dialect == "anthropic":
        return "".join(p["delta"]["text"] for p in payloads if p["type"] == "content_block_delta"
                       and p["delta"]["type"] == "text_delta")
    return "".join(p["delta"] for p in payloads if p["type"] == "response.output_text.delta")


def streamed_reasoning(dialect: str, events: list[Event]) -> str:
    payloads = [e.data for e in events if isinstance(e.data, dict)]
    if dialect == "openai":
        return "".join(p["choices"][0]["delta"].get("reasoning_content") or "" for p in payloads if p.get("choices"))
    if dialect == "anthropic":
        return "".join(p["delta"]["thinking"] for p in payloads if p["type"] == "content_block_delta"
                       and p["delta"]["type"] == "thinking_delta")
    return "".join(p["delta"] for p in payloads if p["type"] == "response.reasoning_summary_text.delta")


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_reasoning_then_text_streams_in_each_dialect(dialect: Dialect) -> None:
    events, acc = replay(dialect, BODIES[dialect.name], recorded("reasoning_content_stream-jsonrpc.stdout.jsonl"))
    assert acc.text == "The answer is 42." and acc.reasoning
    assert streamed_text(dialect.name, events) == acc.text
    assert streamed_reasoning(dialect.name, events) == acc.reasoning
    last = events[-1].data
    if dialect.name == "openai":
        assert last == "[DONE]"
    elif dialect.name == "anthropic":
        names = [e.name for e in events]
        assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
        assert names.count("content_block_start") == names.count("content_block_stop") == 2  # thinking, text
        starts = [e.data["content_block"]["type"] for e in events if e.name == "content_block_start"]  # type: ignore[index]
        assert starts == ["thinking", "text"]
        assert any(e.data["delta"]["type"] == "signature_delta" for e in events  # type: ignore[index]
                   if e.name == "content_block_delta")
    else:
        kinds = [e.name for e in events]
        assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
        assert [e.data["sequence_number"] for e in events] == list(range(len(events)))  # type: ignore[index]
        done = [e.data["item"]["type"] for e in events if e.name == "response.output_item.done"]  # type: ignore[index]
        assert done == ["reasoning", "message"]
        assert last["response"]["output"][1]["content"][0]["text"] == acc.text  # type: ignore[index]


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_text_a_retry_repeats_after_a_retraction_is_streamed_once(dialect: Dialect) -> None:
    stream = recorded("error_hang_mid_stream_stream-jsonrpc_1500s.stdout.jsonl")
    assert sum(1 for e in stream if type(e).__name__ == "TextDelta") == 5  # droid re-streamed it 4 times
    parsed = dialect.parse(BODIES[dialect.name], {})
    encoder = dialect.encoder(FakeTurn(parsed.turn), parsed)  # type: ignore[arg-type]
    acc = Accumulator()
    out: list[Event] = []
    for event in stream:
        for output in acc.feed(event):
            out += encoder.feed(output)
    assert streamed_text(dialect.name, out) == "partial " == acc.text


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_a_failed_turn_ends_the_stream_with_the_dialects_error(dialect: Dialect) -> None:
    events, acc = replay(dialect, BODIES[dialect.name], recorded("rpc_error_401.stdout.jsonl"))
    failure = acc.failure()
    assert failure is not None and "401" in failure.message
    if dialect.name == "openai":
        assert events[-2].data["error"]["code"] == "droid_model_authentication_failed"  # type: ignore[index]
        assert events[-1].data == "[DONE]"
    elif dialect.name == "anthropic":
        assert events[-1].name == "error"
        assert events[-1].data == {"type": "error", "error": {"type": "api_error", "message": failure.message}}
    else:
        assert events[-1].name == "response.failed"
        response = events[-1].data["response"]  # type: ignore[index]
        assert response["status"] == "failed"
        assert response["error"] == {"code": "droid_model_authentication_failed", "message": failure.message}


# --- parsing -------------------------------------------------------------------------------------


def test_anthropic_system_blocks_thinking_and_ignored_params() -> None:
    parsed = anthropic.parse({
        "model": "claude-x", "max_tokens": 1024, "temperature": 0.3, "top_k": 5, "stop_sequences": ["x"],
        "metadata": {"user_id": "u"},
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=1;"},
                   {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "Be kind."}],
        "thinking": {"type": "enabled", "budget_tokens": 4000},
        "messages": [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                              {"type": "text", "text": "a1"}]},
            {"role": "user", "content": [{"type": "text", "text": "q2", "cache_control": {"type": "ephemeral"}}]},
            {"role": "system", "content": "a note"},
        ],
    }, {"anthropic-version": "2023-06-01"})
    turn = parsed.turn
    assert turn.system == "Be brief.\n\nBe kind."  # the per-build billing block is dropped
    assert turn.reasoning_effort == "medium" and not turn.effort_is_exact
    assert [(m.role, m.text) for m in turn.messages] == [("user", "q1"), ("assistant", "a1"), ("user", "q2"),
                                                         ("system", "a note")]
    assert turn.ignored == ("max_tokens", "metadata", "stop_sequences", "temperature", "top_k")


@pytest.mark.parametrize(("thinking", "effort"), [
    ({"type": "enabled", "budget_tokens": 1024}, "low"), ({"type": "enabled", "budget_tokens": 2048}, "low"),
    ({"type": "enabled", "budget_tokens": 8192}, "medium"), ({"type": "enabled", "budget_tokens": 31999}, "high"),
    ({"type": "enabled", "budget_tokens": 64000}, "max"), ({"type": "disabled"}, None),
    ({"type": "adaptive"}, "dynamic"),
])
def test_anthropic_thinking_budgets_map_to_efforts(thinking: dict[str, Any], effort: str | None) -> None:
    assert anthropic.thinking_effort(thinking) == effort


def test_anthropic_output_effort_wins_and_tool_blocks_are_kept() -> None:
    turn = anthropic.parse({"model": "m", "max_tokens": 9, "output_config": {"effort": "high"},
                            "thinking": {"type": "adaptive"}, "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get", "input": {"a": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "is_error": True,
                                      "content": [{"type": "text", "text": "bad"}]}]},
    ]}, {}).turn
    assert turn.reasoning_effort == "high"
    assert turn.messages[1].parts == (ToolCall("t1", "get", '{"a":1}'),)
    assert turn.messages[2].parts == (ToolResult("t1", "bad", True),)


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"model": "m", "max_tokens": 5, "messages": []}, "messages"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "nonsense"}}]}]},
     "messages[0].content[0].source"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document"}]}]},
     "messages[0].content[0].source"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"},
                                                  {"role": "assistant", "content": "prefill"}]}, "messages[1].role"),
    ({"model": "m", "max_tokens": 5, "tool_choice": {"type": "any"}, "messages": [{"role": "user", "content": "x"}]},
     "tool_choice"),
    ({"model": "m", "max_tokens": 5, "thinking": {"type": "enabled"}, "messages": [{"role": "user", "content": "x"}]},
     "thinking.budget_tokens"),
])
def test_anthropic_bad_requests_name_their_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        anthropic.parse(body, {})
    assert info.value.param == param
    status, envelope = anthropic.error_body(info.value)
    assert status == 400 and envelope["type"] == "error" and envelope["error"]["type"] == "invalid_request_error"


def test_responses_input_items_instructions_and_codex_tools() -> None:
    parsed = responses.parse({
        "model": "m", "instructions": "Be brief.", "store": False, "reasoning": {"effort": "low", "summary": "auto"},
        "include": ["reasoning.encrypted_content"], "prompt_cache_key": "k", "parallel_tool_calls": True,
        "tools": [{"type": "function", "name": "f", "parameters": {}}, {"type": "web_search"},
                  {"type": "custom", "name": "apply_patch"}],
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Dev rules."}]},
            {"role": "user", "content": "q1", "id": "msg_1"},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "zzz"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a1", "annotations": []}]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}", "id": "fc_1"},
            {"type": "function_call_output", "call_id": "c1", "output": "42", "id": "fco_1"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "q2"}]},
        ],
    }, {})
    turn = parsed.turn
    assert turn.system == "Be brief.\n\nDev rules." and turn.reasoning_effort == "low" and not turn.keep_output
    assert [m.role for m in turn.messages] == ["user", "assistant", "assistant", "tool", "user"]
    assert turn.messages[2].parts == (ToolCall("c1", "f", "{}"),)
    assert "tools[web_search]" in turn.ignored and "tools[custom]" in turn.ignored and "include" in turn.ignored


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "m"}, "input"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_audio", "input_audio": "x"}]}]},
     "input[0].content[0]"),
    ({"model": "m", "input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format"),
    ({"model": "m", "input": "x", "reasoning": {"effort": "galactic"}}, "reasoning.effort"),
    ({"model": "m", "input": "x", "background": True}, "background"),
    ({"model": "m", "input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"model": "m", "input": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "input"),
])
def test_responses_bad_requests_name_their_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        responses.parse(body, {})
    assert info.value.param == param


def test_an_unknown_previous_response_id_is_a_404_naming_the_field() -> None:
    with pytest.raises(errors.ResponseNotFound) as info:
        responses.parse({"model": "m", "input": "x", "previous_response_id": "resp_nope"}, {})
    status, body = responses.error_body(info.value)
    assert status == 404 and body["error"]["param"] == "previous_response_id"
    assert body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_reasoning_effort_by_header_and_the_body_wins(dialect: Dialect) -> None:
    body = dict(BODIES[dialect.name])
    assert dialect.parse(body, CIMultiDict({"x-reasoning-effort": "high"})).turn.reasoning_effort == "high"
    assert dialect.parse(body, CIMultiDict({"x-reasoning-level": "low"})).turn.reasoning_effort == "low"
    with pytest.raises(errors.InvalidRequest):
        dialect.parse(body, CIMultiDict({"X-Reasoning-Effort": "ludicrous"}))
    in_body = {"openai": {"reasoning_effort": "minimal"}, "anthropic": {"output_config": {"effort": "max"}},
               "responses": {"reasoning": {"effort": "minimal"}}}[dialect.name]
    assert dialect.parse({**body, **in_body}, {"X-Reasoning-Effort": "high"}).turn.reasoning_effort in ("minimal", "max")


# --- each dialect's error table --------------------------------------------------------------------

ERRORS: list[errors.DroidpoolError] = [
    errors.InvalidRequest("x"), errors.Unauthorized("x"), errors.Forbidden("x"), errors.NotFound("x"),
    errors.MethodNotAllowed("x"), errors.RequestTimeout("x"), errors.Conflict("x"), errors.PayloadTooLarge("x"),
    errors.UnsupportedMediaType("x"), errors.Overloaded("x"), errors.UpstreamError("x"), errors.Unavailable("x"),
    errors.DeadlineExceeded("x"), errors.InternalError("x"),
]
ANTHROPIC_TABLE = [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "not_found_error"), (405, "invalid_request_error"), (408, "timeout_error"), (409, "invalid_request_error"),
    (413, "request_too_large"), (415, "invalid_request_error"), (429, "rate_limit_error"), (502, "api_error"),
    (529, "overloaded_error"), (504, "timeout_error"), (500, "api_error"),
]
OPENAI_TABLE = [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "invalid_request_error"), (405, "invalid_request_error"), (408, "invalid_request_error"),
    (409, "invalid_request_error"), (413, "invalid_request_error"), (415, "invalid_request_error"),
    (429, "rate_limit_error"), (502, "upstream_error"), (503, "server_error"), (504, "timeout_error"),
    (500, "server_error"),
]


@pytest.mark.parametrize(("error", "expected"), list(zip(ERRORS, ANTHROPIC_TABLE, strict=True)))
def test_anthropic_error_table(error: errors.DroidpoolError, expected: tuple[int, str]) -> None:
    status, body = anthropic.error_body(error)
    assert (status, body["error"]["type"]) == expected and body["type"] == "error"


@pytest.mark.parametrize(("error", "expected"), list(zip(ERRORS, OPENAI_TABLE, strict=True)))
@pytest.mark.parametrize("dialect", [openai_chat.DIALECT, responses.DIALECT], ids=lambda d: d.name)
def test_openai_error_table(dialect: Dialect, error: errors.DroidpoolError, expected: tuple[int, str]) -> None:
    status, body = dialect.error_body(error)
    assert (status, body["error"]["type"]) == expected and body["error"]["code"] == error.error_code


def test_outputs_of_a_kept_response_come_back_the_same() -> None:
    acc = Accumulator()
    acc.feed(recorded("reasoning_content_stream-jsonrpc.stdout.jsonl")[-1])
    kept = TurnResult("1" * 32, "s", "m", "text", "why", Usage(3, 2), 5)
    echo = {"instructions": "Be brief.", "store": True}
    assert responses.stored({"result": kept.to_json(), "echo": echo}) == responses.completed(kept, echo)
    assert TextOut("a") == TextOut("a")
