"""Chat Completions: request validation, the accumulator over droid events, and the chunks."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from droidpool import errors
from droidpool.api import openai_chat
from droidpool.api.dialect import Parsed
from droidpool.core.model import ReasoningOut, TextOut, TurnRequest, TurnResult
from droidpool.core.output import Accumulator
from droidpool.droid.protocol import (
    Notice,
    Retracted,
    TextDelta,
    ThinkingDelta,
    TurnCompleted,
    TurnError,
    Usage,
)


def parse_chat_request(body: Any, header_session_id: str | None = None) -> TurnRequest:
    headers = {"X-Session-Id": header_session_id} if header_session_id else {}
    return openai_chat.parse(body, headers).turn


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_valid_request_is_parsed_with_ignored_params_listed() -> None:
    parsed = openai_chat.parse(body(stream=True, stream_options={"include_usage": True}, temperature=0.2, foo=1), {})
    assert parsed.turn.stream and parsed.options["include_usage"]
    assert parsed.turn.ignored == ("foo", "temperature")


def test_session_id_from_body_wins_over_header() -> None:
    assert parse_chat_request(body(session_id="a"), "b").session_id == "a"
    assert parse_chat_request(body(), "b").session_id == "b"


def test_content_parts_and_developer_role() -> None:
    req = parse_chat_request({"model": "m", "messages": [
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]})
    assert req.system == "rules"
    assert [(m.role, m.text) for m in req.messages] == [("user", "ab")]


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        (body(messages=[]), "messages"),
        (body(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
        (body(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
        (body(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]), "messages[0].content[0]"),
        (body(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]), "messages[1].role"),
        (body(n=3), "n"),
        (body(logprobs=True), "logprobs"),
        (body(response_format={"type": "grammar"}), "response_format"),
        (body(tool_choice="required"), "tool_choice"),
        (body(stream="yes"), "stream"),
        (body(reasoning_effort="enormous"), "reasoning_effort"),
    ],
)
def test_invalid_requests_name_their_param(raw: dict[str, Any], param: str) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        parse_chat_request(raw)
    assert info.value.param == param
    assert info.value.status == 400
    assert openai_chat.DIALECT.error_body(info.value)[1]["error"]["type"] == "invalid_request_error"


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda children: st.lists(children) | st.dictionaries(st.text(), children), max_leaves=20))
def test_any_json_is_either_accepted_or_a_400(value: Any) -> None:
    for candidate in (value, {"model": "m", "messages": value}, {"model": value, "messages": [{"role": "user", "content": "x"}]}):
        try:
            parse_chat_request(candidate)
        except errors.InvalidRequest:
            pass


def feed_all(acc: Accumulator, events: list[Any]) -> str:
    return "".join(o.text for event in events for o in acc.feed(event) if isinstance(o, TextOut))


def test_the_accumulator_streams_text_and_reasoning_and_keeps_usage() -> None:
    acc = Accumulator()
    outputs = []
    for event in [ThinkingDelta("a", "hmm"), TextDelta("a", "Hel"), TextDelta("a", "lo"),
                  TurnCompleted("completed", Usage(5, 2, 1, 0, 3))]:
        outputs += acc.feed(event)
    assert outputs == [ReasoningOut("hmm"), TextOut("Hel"), TextOut("lo")]
    assert acc.failure() is None and acc.text == "Hello" and acc.reasoning == "hmm"
    assert acc.usage == Usage(5, 2, 1, 0, 3)


def test_retracted_text_replayed_by_a_retry_is_not_sent_twice() -> None:
    acc = Accumulator()
    sent = feed_all(acc, [
        TextDelta("a", "The ans"), Retracted("a"),
        TextDelta("a", "The "), TextDelta("a", "answer is 42."),
        TurnCompleted("completed"),
    ])
    assert sent == "The answer is 42."
    assert acc.text == "The answer is 42."


def test_the_final_text_drops_retracted_text_even_when_the_retry_differs() -> None:
    acc = Accumulator()
    feed_all(acc, [TextDelta("a", "partial "), Retracted("a"), TextDelta("a", "Other answer.")])
    assert acc.text == "Other answer."


def test_separate_assistant_messages_are_separated() -> None:
    acc = Accumulator()
    assert feed_all(acc, [TextDelta("a", "Let me look."), TextDelta("b", "Found it.")]) == "Let me look.\n\nFound it."


@pytest.mark.parametrize(
    ("reason", "kind", "status", "code"),
    [("model_authentication_failed", errors.UpstreamError, 502, "droid_model_authentication_failed"),
     ("model_rate_limited", errors.UpstreamRateLimited, 429, "upstream_rate_limited"),
     ("error", errors.UpstreamError, 502, "droid_error")],
)
def test_failed_turns_map_to_errors_carrying_droids_words(reason: str, kind: type, status: int, code: str) -> None:
    acc = Accumulator()
    feed_all(acc, [TurnError("401 Invalid API key"), Notice("BYOK Error: details"), TurnCompleted(reason)])
    failure = acc.failure()
    assert isinstance(failure, kind) and failure.status == status
    assert "401 Invalid API key" in failure.message and "BYOK Error" in failure.message
    assert openai_chat.DIALECT.error_body(failure)[1]["error"]["code"] == code


class _Turn:
    turn_id = "x"
    created = 1
    request = TurnRequest("m", ())


def test_chunks_and_completions_have_the_openai_shape() -> None:
    encoder = openai_chat.ChatEncoder(_Turn(), Parsed(TurnRequest("m", ()), {"include_usage": True}))  # type: ignore[arg-type]
    chunk = encoder.feed(TextOut("a"))[0].data
    assert chunk["object"] == "chat.completion.chunk" and chunk["choices"][0]["finish_reason"] is None  # type: ignore[index]
    assert chunk["id"] == "chatcmpl-x" and chunk["choices"][0]["delta"] == {"content": "a"}  # type: ignore[index]
    assert encoder.feed(ReasoningOut("r"))[0].data["choices"][0]["delta"] == {"reasoning_content": "r"}  # type: ignore[index]
    result = TurnResult("x", "s", "m", "Hello", "hmm", Usage(5, 2, 1, 0, 3), 1)
    finish, usage, done = encoder.finish(result)
    assert finish.data["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]
    assert usage.data["choices"] == [] and set(usage.data["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}  # type: ignore[index]
    assert done.data == "[DONE]"
    completion = encoder.body(result)
    assert completion["choices"][0]["message"] == {
        "role": "assistant", "content": "Hello", "refusal": None, "reasoning_content": "hmm"}
    assert completion["usage"]["prompt_tokens"] == 6 and completion["usage"]["completion_tokens"] == 2
    assert completion["usage"]["completion_tokens_details"]["reasoning_tokens"] == 3
