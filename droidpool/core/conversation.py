"""Conversation identity: normalized history, chained digests, and the prompt for a droid turn."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_SPACE = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # system | user | assistant | tool (developer is folded into system)
    text: str


def normalize(text: str) -> str:
    """What a resend may change without changing meaning: whitespace runs and padding."""
    return _SPACE.sub(" ", text).strip()


def seed(system: str, namespace: str = "") -> str:
    """The digest before any message: different system prompts never share a conversation."""
    return hashlib.sha256(f"droidpool/1\0{namespace}\0{normalize(system)}".encode()).hexdigest()


def extend(digest: str, messages: Iterable[ChatMessage]) -> str:
    """Chain ``messages`` onto ``digest``; equal histories give equal digests, incrementally."""
    for message in messages:
        digest = hashlib.sha256(
            f"{digest}\0{message.role}\0{normalize(message.text)}".encode()
        ).hexdigest()
    return digest


@dataclass(frozen=True, slots=True)
class Split:
    """A request's history cut where the known conversation ends and the new turn begins."""

    system: str
    history: tuple[ChatMessage, ...]  # everything up to and including the last assistant message
    new: tuple[ChatMessage, ...]  # the messages after it: the new turn


def split(messages: Sequence[ChatMessage]) -> Split:
    system = "\n\n".join(m.text for m in messages if m.role == "system")
    turns = [m for m in messages if m.role != "system"]
    last_assistant = max((i for i, m in enumerate(turns) if m.role == "assistant"), default=-1)
    return Split(system, tuple(turns[: last_assistant + 1]), tuple(turns[last_assistant + 1 :]))


def turn_text(new: Sequence[ChatMessage]) -> str:
    """The text droid receives for the new turn."""
    parts = [m.text if m.role == "user" else f"[{m.role} message]\n{m.text}" for m in new]
    return "\n\n".join(parts)


def transcript_prompt(history: Sequence[ChatMessage], new: Sequence[ChatMessage]) -> str:
    """A new droid session for a conversation that already has turns: the earlier turns are
    given once, clearly delimited, ahead of the new message."""
    if not history:
        return turn_text(new)
    lines = [
        "The conversation so far is below, between <conversation> tags; continue it by "
        "answering the last message after the tags.",
        "<conversation>",
    ]
    for message in history:
        lines.append(f"<{message.role}>\n{message.text}\n</{message.role}>")
    lines.append("</conversation>")
    lines.append("")
    lines.append(turn_text(new))
    return "\n".join(lines)


MAX_KEY_CHARS = 200
_KEY_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BadKey(ValueError):
    """A conversation id a client chose is unusable; the message says why."""


def conversation_key(value: object) -> str | None:
    """A client-chosen conversation id as stored: 1 to 200 characters, no control characters,
    surrounding whitespace dropped; None or "" means none was given."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadKey("must be a string")
    key = value.strip()
    if not key:
        return None
    if len(key) > MAX_KEY_CHARS or _KEY_CONTROL.search(key):
        raise BadKey(f"must be at most {MAX_KEY_CHARS} characters, without control characters")
    return key
