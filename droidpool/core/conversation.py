"""Conversation identity: normalized history, chained digests, and the prompt for a droid turn."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import orjson

from droidpool.droid.protocol import File, Image, UserMessage

from .model import Attachment, Message, OutputFormat, Part, Text, ToolCall, ToolResult

_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """What a resend may change without changing meaning: whitespace runs and padding."""
    return _SPACE.sub(" ", text).strip()


def seed(system: str, namespace: str = "") -> str:
    """The digest before any message: different system prompts never share a conversation."""
    return hashlib.sha256(f"droidpool/1\0{namespace}\0{normalize(system)}".encode()).hexdigest()


def canonical(messages: Iterable[Message]) -> list[Message]:
    """One form of a history for every dialect: each tool result is a ``tool`` message of its
    own (Anthropic puts them in a user message), and consecutive assistant messages are one
    (Responses sends a call as an item of its own)."""
    out: list[Message] = []
    for message in messages:
        results = [p for p in message.parts if isinstance(p, ToolResult)]
        if results and message.role != "tool":
            out.extend(Message("tool", (r,)) for r in results)
            rest = tuple(p for p in message.parts if not isinstance(p, ToolResult))
            if any(isinstance(p, Attachment) or (isinstance(p, Text) and p.text.strip()) for p in rest):
                out.append(Message(message.role, rest))
            continue
        if message.role == "tool" and len(results) > 1:
            out.extend(Message("tool", (r,)) for r in results)
            continue
        if out and message.role == "assistant" and out[-1].role == "assistant":
            out[-1] = Message("assistant", (*out[-1].parts, *message.parts))
            continue
        out.append(message)
    return out


def _arguments(arguments: str) -> str:
    """Tool-call arguments as canonical JSON (key order and spacing do not matter)."""
    try:
        return orjson.dumps(orjson.loads(arguments), option=orjson.OPT_SORT_KEYS).decode()
    except orjson.JSONDecodeError:
        return normalize(arguments)


def _hashed(message: Message) -> str:
    # Text-only messages hash as they always have: role and normalized text. A message with tool
    # calls is known by its calls (their ids are unique): clients that resend it without the
    # text that came with the calls, or with the text in an item of its own, still match.
    # Attachments are known by the hash of their bytes, whatever the dialect wrapped them in.
    calls = any(isinstance(p, ToolCall) for p in message.parts)
    form = f"{message.role}\0{'' if calls else normalize(message.text)}"
    for part in message.parts:
        if isinstance(part, ToolCall):
            form += f"\0call\0{part.id}\0{part.name}\0{_arguments(part.arguments)}"
        elif isinstance(part, ToolResult):
            form += f"\0result\0{part.call_id}\0{int(part.is_error)}\0{normalize(part.content)}"
            form += "".join(f"\0{a.kind}\0{a.sha256}" for a in part.attachments)
        elif isinstance(part, Attachment):
            form += f"\0{part.kind}\0{part.sha256}"
    return form


def extend(digest: str, messages: Iterable[Message]) -> str:
    """Chain ``messages`` onto ``digest``; equal histories give equal digests, incrementally."""
    for message in canonical(messages):
        digest = hashlib.sha256(f"{digest}\0{_hashed(message)}".encode()).hexdigest()
    return digest


@dataclass(frozen=True, slots=True)
class Split:
    """A request's messages cut where the known conversation ends and the new turn begins."""

    history: tuple[Message, ...]  # everything up to and including the last assistant message
    new: tuple[Message, ...]  # the messages after it: the new turn


def split(messages: Sequence[Message]) -> Split:
    last_assistant = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
    return Split(tuple(messages[: last_assistant + 1]), tuple(messages[last_assistant + 1 :]))


def _render(parts: Sequence[Part], labels: bool = False) -> str:
    """A message's text for droid. Attachments go to droid as files of their own: a user's are
    left out of the text, unless ``labels`` (a transcript) names them where they stood."""
    out = []
    for part in parts:
        if isinstance(part, Text):
            out.append(part.text)
        elif isinstance(part, Attachment):
            if labels:
                out.append(part.label)
        elif isinstance(part, ToolCall):
            out.append(f"[tool call {part.id}: {part.name}({part.arguments})]")
        else:
            status = "error" if part.is_error else "result"
            out.append(f"[tool {status} for {part.call_id}]\n{part.content}")
            out.extend(a.label for a in part.attachments)
    if all(isinstance(p, Text) for p in parts) or (not labels and all(isinstance(p, Text | Attachment) for p in parts)):
        return "".join(out)
    return "\n".join(out)


def turn_text(new: Sequence[Message]) -> str:
    """The text droid receives for the new turn."""
    parts = [_render(m.parts) if m.role in ("user", "tool") else f"[{m.role} message]\n{_render(m.parts)}" for m in new]
    return "\n\n".join(parts)


def transcript_prompt(history: Sequence[Message], new: Sequence[Message]) -> str:
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
        lines.append(f"<{message.role}>\n{_render(message.parts, labels=True)}\n</{message.role}>")
    lines.append("</conversation>")
    lines.append("")
    lines.append(turn_text(new))
    return "\n".join(lines)


def attachments(messages: Iterable[Message]) -> list[Attachment]:
    """The attachments droid is sent with the prompt of ``messages``, in order."""
    return [a for m in messages for a in m.attachments]


def user_message(prompt: str, attached: Sequence[Attachment], output_format: OutputFormat | None) -> UserMessage:
    """What droid is given for a turn: the prompt, its checked attachments, the answer's schema."""
    return UserMessage(
        prompt,
        images=tuple(Image(a.media_type, a.data) for a in attached if a.kind == "image"),
        files=tuple(File(a.media_type, a.data, a.name, a.is_text) for a in attached if a.kind == "document"),
        output_schema=output_format.schema if output_format is not None else None,
    )


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
