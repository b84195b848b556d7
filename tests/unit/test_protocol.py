"""droid's recorded stdout parses into the messages and turn events droidpool acts on."""

from __future__ import annotations

from pathlib import Path

import pytest

from droidpool.droid.protocol import (
    Notice,
    Notification,
    ProtocolError,
    Response,
    Retracted,
    Retrying,
    ServerRequest,
    TextDelta,
    ThinkingDelta,
    TurnCompleted,
    TurnError,
    encode_request,
    parse_line,
    turn_event,
)

FIXTURES = Path(__file__).parent.parent / "fixtures"


def events(name: str) -> list[object]:
    out = []
    for line in (FIXTURES / name).read_bytes().splitlines():
        message = parse_line(line)
        if isinstance(message, Notification):
            event = turn_event(message)
            if event is not None:
                out.append(event)
    return out


def test_multiturn_transcript_gives_deltas_and_completions_with_usage() -> None:
    evs = events("rpc_multiturn_one_process.stdout.jsonl")
    completions = [e for e in evs if isinstance(e, TurnCompleted)]
    assert [c.reason for c in completions] == ["completed"] * 3
    assert completions[0].usage.input_tokens == 205 and completions[0].usage.output_tokens == 14
    deltas = [e for e in evs if isinstance(e, TextDelta)]
    assert len(deltas) == 3 and all(d.text.startswith("ECHO") for d in deltas)


def test_reasoning_transcript_gives_thinking_then_text() -> None:
    evs = events("reasoning_content_stream-jsonrpc.stdout.jsonl")
    thinking = "".join(e.text for e in evs if isinstance(e, ThinkingDelta))
    text = "".join(e.text for e in evs if isinstance(e, TextDelta))
    assert thinking == "Let me think about it."
    assert text == "The answer is 42."
    first_text = next(i for i, e in enumerate(evs) if isinstance(e, TextDelta))
    assert all(not isinstance(e, ThinkingDelta) for e in evs[first_text:])


def test_500_transcript_gives_retries_retractions_and_a_failed_turn() -> None:
    evs = events("error_err500_stream-jsonrpc.stdout.jsonl")
    assert sum(isinstance(e, Retrying) for e in evs) == 10
    assert sum(isinstance(e, Retracted) for e in evs) == 9
    assert any(isinstance(e, TurnError) for e in evs)
    assert any(isinstance(e, Notice) and "BYOK Error: 500" in e.text for e in evs)
    assert isinstance(evs[-1], TurnCompleted) and evs[-1].reason == "model_provider_unavailable"


def test_401_transcript_fails_with_authentication_reason() -> None:
    evs = events("rpc_error_401.stdout.jsonl")
    assert isinstance(evs[-1], TurnCompleted)
    assert evs[-1].reason == "model_authentication_failed"
    assert any(isinstance(e, TurnError) and "401" in e.message for e in evs)


def test_permission_request_and_error_response_parse() -> None:
    lines = (FIXTURES / "rpc_tool_permission_proceed_once.stdout.jsonl").read_bytes().splitlines()
    requests = [m for m in map(parse_line, lines) if isinstance(m, ServerRequest)]
    assert [r.method for r in requests] == ["droid.request_permission"]
    assert requests[0].params["options"][0]["value"] == "proceed_once"
    unknown = [parse_line(line) for line in (FIXTURES / "rpc_load_session_unknown.stdout.jsonl").read_bytes().splitlines()]
    errors = [m for m in unknown if isinstance(m, Response) and m.error]
    assert errors and errors[0].error == {"code": -32004, "message": "Session not found"}


@pytest.mark.parametrize("line", [b"not json", b"[1,2]", b'{"type":"mystery"}', b'{"type":"notification","params":{}}'])
def test_malformed_lines_raise_protocol_error(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_line(line)


def test_request_envelope_has_the_fields_droid_requires() -> None:
    import orjson

    request = orjson.loads(encode_request("id-1", "droid.list_models", {}))
    assert request["type"] == "request" and request["factoryApiVersion"] == "1.0.0"
    assert request["jsonrpc"] == "2.0" and request["id"] == "id-1"


def test_client_tool_transcripts_give_calls_then_one_permission_request() -> None:
    from droidpool.droid.protocol import ToolCallSeen, tool_uses

    for name, count in (("single", 1), ("parallel", 2), ("error", 1), ("cancel", 1)):
        messages = [parse_line(line) for line in
                    (FIXTURES / f"rpc_client_tools_{name}.stdout.jsonl").read_bytes().splitlines()]
        seen = [turn_event(m) for m in messages if isinstance(m, Notification)]
        calls = [e for e in seen if isinstance(e, ToolCallSeen)]
        # Each call twice: as soon as the name is known (empty input), then whole.
        assert [c.input == {} for c in calls] == [True] * count + [False] * count
        assert all(c.name.startswith("droidpool-github___") for c in calls)
        (asked,) = [m for m in messages if isinstance(m, ServerRequest) and m.method == "droid.request_permission"]
        uses = tool_uses(asked.params)
        assert [u.id for u in uses] == [c.id for c in calls[count:]]
        assert asked.params["toolUses"][0]["confirmationType"] == "mcp_tool"
        assert asked.params["toolUses"][0]["details"]["serverName"] == "droidpool-github"
        done = [e for e in seen if isinstance(e, TurnCompleted)]
        assert [d.reason for d in done] == ["completed"]  # a cancel ends the turn, completed too
    # A park that expires is interrupted: droid resolves its own request (cancel) and the turn ends.
    messages = [parse_line(line) for line in
                (FIXTURES / "rpc_client_tools_interrupted.stdout.jsonl").read_bytes().splitlines()]
    done = [e for e in (turn_event(m) for m in messages if isinstance(m, Notification)) if isinstance(e, TurnCompleted)]
    assert [d.reason for d in done] == ["cancelled"]


def test_a_prompt_cache_hit_is_reported_as_cache_read_tokens_and_byok_earns_no_credits() -> None:
    """Recorded: a BYOK model's upstream reports ``cached_tokens`` 40 of its prompt on each of the
    turn's two LLM calls (the answer and droid's own title request): droid sums both, puts the
    cached part in cacheReadTokens, keeps inputTokens the uncached rest, and credits nothing."""
    (completed,) = [e for e in events("rpc_usage_cached.stdout.jsonl") if isinstance(e, TurnCompleted)]
    usage = completed.usage
    assert (usage.input_tokens, usage.cache_read_tokens, usage.output_tokens) == (25, 80, 16)
    assert usage.factory_credits == 0.0 and usage.prompt_tokens == 105
