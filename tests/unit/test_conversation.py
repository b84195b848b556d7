"""Conversation identity: what a stateless client's resend must match."""

from __future__ import annotations

from droidpool.core.conversation import (
    extend,
    seed,
    split,
    transcript_prompt,
    turn_text,
)
from droidpool.core.model import Message, Text, ToolCall, ToolResult

U, A = "user", "assistant"


def ChatMessage(role: str, text: str) -> Message:  # noqa: N802 - reads like the message it builds
    return Message.of(role, text)  # type: ignore[arg-type]


def digest(system: str, *messages: tuple[str, str]) -> str:
    return extend(seed(system), [ChatMessage(r, t) for r, t in messages])


def test_whitespace_changes_do_not_change_the_digest() -> None:
    assert digest("sys", (U, "hello  world"), (A, "hi\n")) == digest(" sys ", (U, " hello world"), (A, "hi"))


def test_edits_roles_order_and_system_prompt_change_the_digest() -> None:
    base = digest("sys", (U, "a"), (A, "b"))
    assert base != digest("sys", (U, "a"), (A, "c"))
    assert base != digest("sys", (A, "a"), (A, "b"))
    assert base != digest("other", (U, "a"), (A, "b"))
    assert base != digest("sys", (U, "a"))


def test_digest_chains_incrementally() -> None:
    step = extend(seed(""), [ChatMessage(U, "a")])
    assert extend(step, [ChatMessage(A, "b")]) == digest("", (U, "a"), (A, "b"))


def test_split_cuts_after_the_last_assistant_message() -> None:
    cut = split([ChatMessage(U, "a"), ChatMessage(A, "b"), ChatMessage(U, "c"), ChatMessage(U, "d")])
    assert [m.text for m in cut.history] == ["a", "b"]
    assert [m.text for m in cut.new] == ["c", "d"]
    assert turn_text(cut.new) == "c\n\nd"


def test_transcript_prompt_delimits_the_earlier_turns() -> None:
    prompt = transcript_prompt([ChatMessage(U, "q1"), ChatMessage(A, "a1")], [ChatMessage(U, "q2")])
    assert prompt.startswith("The conversation so far")
    assert "<user>\nq1\n</user>" in prompt and "<assistant>\na1\n</assistant>" in prompt
    assert prompt.endswith("\nq2")
    assert transcript_prompt([], [ChatMessage(U, "only")]) == "only"


def test_text_only_digests_are_the_ones_stored_before_tool_content_existed() -> None:
    import hashlib

    expected = hashlib.sha256(f"{seed('s')}\0user\0hello world".encode()).hexdigest()
    assert digest("s", (U, "hello   world")) == expected


def test_the_canonical_form_is_the_same_whichever_dialect_sent_the_history() -> None:
    call_a, call_b = ToolCall("c1", "get", '{"city": "Paris", "unit": "c"}'), ToolCall("c2", "get", "{}")
    # Chat Completions: one assistant message with calls, then one tool message per result.
    chat = [Message("user", (Text("q"),)), Message("assistant", (Text(""), call_a, call_b)),
            Message("tool", (ToolResult("c1", "sunny"),)), Message("tool", (ToolResult("c2", "rain"),))]
    # Anthropic: the results are blocks of one user message; argument JSON spaced differently.
    anthropic = [Message("user", (Text("q"),)),
                 Message("assistant", (ToolCall("c1", "get", '{"unit":"c","city":"Paris"}'), call_b)),
                 Message("user", (ToolResult("c1", "sunny"), ToolResult("c2", " rain ")))]
    # Responses: every call and output is an item of its own.
    responses = [Message("user", (Text("q"),)), Message("assistant", (call_a,)), Message("assistant", (call_b,)),
                 Message("tool", (ToolResult("c1", "sunny"),)), Message("tool", (ToolResult("c2", "rain"),))]
    digests = {extend(seed(""), h) for h in (chat, anthropic, responses)}
    assert len(digests) == 1
    assert extend(seed(""), chat[:-1]) not in digests
    errored = [*chat[:-1], Message("tool", (ToolResult("c2", "rain", is_error=True),))]
    assert extend(seed(""), errored) not in digests
