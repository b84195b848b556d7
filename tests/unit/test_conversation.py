"""Conversation identity: what a stateless client's resend must match."""

from __future__ import annotations

from droidpool.core.conversation import (
    ChatMessage,
    extend,
    seed,
    split,
    transcript_prompt,
    turn_text,
)

U, A, S = "user", "assistant", "system"


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
    cut = split([ChatMessage(S, "s"), ChatMessage(U, "a"), ChatMessage(A, "b"), ChatMessage(U, "c"), ChatMessage(U, "d")])
    assert cut.system == "s"
    assert [m.text for m in cut.history] == ["a", "b"]
    assert [m.text for m in cut.new] == ["c", "d"]
    assert turn_text(cut.new) == "c\n\nd"


def test_transcript_prompt_delimits_the_earlier_turns() -> None:
    prompt = transcript_prompt([ChatMessage(U, "q1"), ChatMessage(A, "a1")], [ChatMessage(U, "q2")])
    assert prompt.startswith("The conversation so far")
    assert "<user>\nq1\n</user>" in prompt and "<assistant>\na1\n</assistant>" in prompt
    assert prompt.endswith("\nq2")
    assert transcript_prompt([], [ChatMessage(U, "only")]) == "only"
