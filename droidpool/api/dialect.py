"""What a wire dialect provides: parse (body + headers → turn request), an encoder, an error body."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from droidpool import errors
from droidpool.config import REASONING_EFFORTS
from droidpool.core import conversation
from droidpool.core.model import Output, TurnRequest, TurnResult
from droidpool.core.turn import Turn


@dataclass(frozen=True, slots=True)
class Event:
    """One server-sent event: a JSON payload (or a literal like ``[DONE]``), maybe named."""

    data: Mapping[str, Any] | str
    name: str | None = None


COMMENT = Event(": keep-alive")  # a comment line: every SSE client ignores it


class Encoder(Protocol):
    """Turns one turn's neutral outputs into a dialect's response, streamed or whole."""

    def start(self) -> list[Event]: ...
    def feed(self, output: Output) -> list[Event]: ...
    def keepalive(self) -> list[Event]: ...
    def finish(self, result: TurnResult) -> list[Event]: ...
    def failed(self, error: errors.DroidpoolError) -> list[Event]: ...
    def body(self, result: TurnResult) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Parsed:
    """A parsed request: the neutral turn, plus options only its dialect's encoder reads."""

    turn: TurnRequest
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Dialect:
    name: str
    parse: Callable[[Any, Mapping[str, str]], Parsed]
    encoder: Callable[[Turn, Parsed], Encoder]
    error_body: Callable[[errors.DroidpoolError], tuple[int, dict[str, Any]]]


# --- what every dialect reads the same way ----------------------------------------------------


def header_effort(headers: Mapping[str, str]) -> str | None:
    """Reasoning effort from ``X-Reasoning-Effort`` (or droid2api's ``x-reasoning-level``), for
    clients that cannot set body fields; a body field wins over it."""
    for name in ("X-Reasoning-Effort", "X-Reasoning-Level"):
        value = header(headers, name)
        if value is not None and value.strip():
            effort = value.strip().lower()
            check_effort(effort, name)
            return effort
    return None


def check_effort(effort: str, param: str) -> None:
    if effort not in REASONING_EFFORTS:
        raise errors.InvalidRequest(f"'{param}' must be one of {', '.join(REASONING_EFFORTS)}.", param=param)


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value, which must be valid UTF-8 (aiohttp keeps other bytes as surrogates)."""
    value = headers.get(name)
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise errors.InvalidRequest(f"'{name}' is not valid UTF-8.", param=name) from None
    return value


def conversation_key(body: Mapping[str, Any], headers: Mapping[str, str]) -> str | None:
    """The client's conversation id: the body's ``conversation_id`` wins over the header."""
    from_body = body.get("conversation_id")
    param = "conversation_id" if from_body is not None else "X-Conversation-Id"
    try:
        return conversation.conversation_key(from_body if from_body is not None else header(headers, "X-Conversation-Id"))
    except conversation.BadKey as exc:
        raise errors.InvalidRequest(f"'{param}' {exc}.", param="conversation_id") from None


def session_id(body: Mapping[str, Any], headers: Mapping[str, str]) -> str | None:
    """The droid session to continue: the body's ``session_id`` wins over ``X-Session-Id``."""
    value = body.get("session_id")
    if value is not None and not isinstance(value, str):
        raise errors.InvalidRequest("'session_id' must be a string.", param="session_id")
    return value or header(headers, "X-Session-Id") or None


def optional(body: Mapping[str, Any], key: str, kind: type, default: Any, param: str | None = None) -> Any:
    """``body[key]`` if present and of ``kind`` (a bool is not an int), else a 400 naming it."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise errors.InvalidRequest(f"'{param or key}' has the wrong type.", param=param or key)
    return value


OWN_PARAMS = frozenset({"session_id", "conversation_id"})  # droidpool's own body fields, in every dialect
