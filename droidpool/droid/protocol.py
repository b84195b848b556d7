"""droid's stream-jsonrpc protocol: request envelopes out, typed messages and turn events in."""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

API_VERSION = "1.0.0"


def encode_request(request_id: str, method: str, params: dict[str, Any]) -> bytes:
    """One request line; droid refuses envelopes without ``type`` and ``factoryApiVersion``."""
    return orjson.dumps(
        {
            "jsonrpc": "2.0",
            "factoryApiVersion": API_VERSION,
            "type": "request",
            "id": request_id,
            "method": method,
            "params": params,
        }
    ) + b"\n"


def encode_response(request_id: Any, result: dict[str, Any]) -> bytes:
    """Our answer to a request droid sent us (``droid.request_permission``, ``droid.ask_user``)."""
    return orjson.dumps(
        {
            "jsonrpc": "2.0",
            "factoryApiVersion": API_VERSION,
            "type": "response",
            "id": request_id,
            "result": result,
        }
    ) + b"\n"


@dataclass(frozen=True, slots=True)
class Image:
    media_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class File:
    """A document: text (sent as it is) or binary, a PDF (sent as base64)."""

    media_type: str
    data: bytes
    name: str = ""
    text: bool = False


@dataclass(frozen=True, slots=True)
class UserMessage:
    """What ``droid.add_user_message`` gives droid: text, images, documents and, for a structured
    answer, the JSON schema droid makes the final answer match (``outputFormat``)."""

    text: str
    images: tuple[Image, ...] = ()
    files: tuple[File, ...] = ()
    output_schema: Mapping[str, Any] | None = None

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"text": self.text}
        if self.images:
            params["images"] = [{"type": "base64", "mediaType": i.media_type, "data": _b64(i.data)}
                                for i in self.images]
        if self.files:
            params["files"] = [_file(f) for f in self.files]
        if self.output_schema is not None:
            params["outputFormat"] = {"type": "json_schema", "schema": dict(self.output_schema)}
        return params


def _file(f: File) -> dict[str, Any]:
    if not f.text:
        return {"type": "base64", "mediaType": f.media_type, "data": _b64(f.data), **_name(f.name)}
    # droid 0.225.2 takes text files only as text/plain (any other mediaType: -32602 Invalid
    # input); the real type goes in ``mime``.
    mime = {"mime": f.media_type} if f.media_type != "text/plain" else {}
    return {"type": "text", "mediaType": "text/plain", "data": f.data.decode("utf-8"), **_name(f.name), **mime}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _name(name: str) -> dict[str, str]:
    return {"name": name} if name else {}


class ProtocolError(ValueError):
    """A stdout line that is not a droid JSON-RPC message."""


@dataclass(frozen=True, slots=True)
class Response:
    id: Any
    result: dict[str, Any] | None
    error: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class ServerRequest:
    id: Any
    method: str
    params: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Notification:
    session_id: str | None
    kind: str
    payload: dict[str, Any]


Message = Response | ServerRequest | Notification


def parse_line(line: bytes) -> Message:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("not a JSON object")
    kind = obj.get("type")
    if kind == "response":
        result, error = obj.get("result"), obj.get("error")
        return Response(
            obj.get("id"),
            result if isinstance(result, dict) else None,
            error if isinstance(error, dict) else None,
        )
    if kind == "request":
        params = obj.get("params")
        return ServerRequest(obj.get("id"), str(obj.get("method")), params if isinstance(params, dict) else {})
    if kind == "notification":
        params = obj.get("params")
        if not isinstance(params, dict):
            raise ProtocolError("notification without params")
        note = params.get("notification")
        if not isinstance(note, dict) or not isinstance(note.get("type"), str):
            raise ProtocolError("notification without a type")
        session_id = params.get("sessionId") or note.get("sessionId")
        return Notification(session_id if isinstance(session_id, str) else None, note["type"], note)
    raise ProtocolError(f"unknown message type {kind!r}")


# --- turn events: what one turn's notifications mean to a client ---------------------------


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    thinking_tokens: int = 0
    # droid's own estimate of the turn's Factory credits (0 for BYOK models, or when droid
    # cannot price the model); not part of what clients are sent.
    factory_credits: float = 0.0

    @classmethod
    def from_droid(cls, raw: Any) -> Usage:
        if not isinstance(raw, dict):
            return cls()

        def num(key: str) -> int:
            value = raw.get(key, 0)
            return value if isinstance(value, int) and not isinstance(value, bool) else 0

        return cls(
            num("inputTokens"),
            num("outputTokens"),
            num("cacheReadTokens"),
            num("cacheCreationTokens"),
            num("thinkingTokens"),
            _credits(raw.get("factoryCredits")),
        )

    def to_json(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_creation_tokens": self.cache_creation_tokens,
            "thinking_tokens": self.thinking_tokens,
        }

    @classmethod
    def from_json(cls, raw: Any) -> Usage:
        """The inverse of ``to_json`` (missing or malformed counts are 0)."""
        if not isinstance(raw, dict):
            return cls()
        counts = [raw.get(k) for k in cls().to_json()]
        return cls(*(v if isinstance(v, int) and not isinstance(v, bool) else 0 for v in counts))

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens,
                     self.cache_read_tokens + other.cache_read_tokens,
                     self.cache_creation_tokens + other.cache_creation_tokens,
                     self.thinking_tokens + other.thinking_tokens, self.factory_credits + other.factory_credits)

    @property
    def prompt_tokens(self) -> int:
        """Every input token, as clients count them: fresh, cache read and cache creation."""
        return self.input_tokens + self.cache_read_tokens + self.cache_creation_tokens


def _credits(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    return 0.0


@dataclass(frozen=True, slots=True)
class TextDelta:
    message_id: str
    text: str


@dataclass(frozen=True, slots=True)
class ThinkingDelta:
    message_id: str
    text: str


@dataclass(frozen=True, slots=True)
class Retracted:
    """droid discards what it streamed for ``message_id``; a retry re-streams it."""

    message_id: str


@dataclass(frozen=True, slots=True)
class Retrying:
    attempt: int
    reason: str


@dataclass(frozen=True, slots=True)
class TurnError:
    message: str


@dataclass(frozen=True, slots=True)
class Notice:
    """A ``user_only`` system message (droid's explanation of a failed turn)."""

    text: str


@dataclass(frozen=True, slots=True)
class TurnCompleted:
    reason: str
    usage: Usage = field(default_factory=Usage)
    duration_ms: int = 0


@dataclass(frozen=True, slots=True)
class ToolCallSeen:
    """The LLM calls a tool: once with an empty input as soon as the name is known, then with
    the whole input (droid 0.225.2 streams no partial arguments)."""

    id: str
    name: str
    input: Any


@dataclass(frozen=True, slots=True)
class ToolUse:
    id: str
    name: str
    input: Any


@dataclass(frozen=True, slots=True)
class PermissionAsked:
    """droid waits, with no timeout, for permission to run these tool uses of one assistant
    message (``droid.request_permission``); the turn answers it."""

    request_id: Any
    tool_uses: tuple[ToolUse, ...]


TurnEvent = (TextDelta | ThinkingDelta | Retracted | Retrying | TurnError | Notice | TurnCompleted | ToolCallSeen
             | PermissionAsked)


def tool_uses(params: dict[str, Any]) -> tuple[ToolUse, ...]:
    """The tool uses a ``droid.request_permission`` lists."""
    out = []
    for entry in params.get("toolUses") or ():
        use = entry.get("toolUse") if isinstance(entry, dict) else None
        if isinstance(use, dict) and isinstance(use.get("id"), str) and isinstance(use.get("name"), str):
            out.append(ToolUse(use["id"], use["name"], use.get("input") if use.get("input") is not None else {}))
    return tuple(out)



def turn_event(note: Notification) -> TurnEvent | None:
    """The client-relevant meaning of one notification, or None for bookkeeping ones."""
    p = note.payload
    if note.kind == "assistant_text_delta":
        return TextDelta(str(p.get("messageId", "")), str(p.get("textDelta", "")))
    if note.kind == "thinking_text_delta":
        return ThinkingDelta(str(p.get("messageId", "")), str(p.get("textDelta", "")))
    if note.kind == "assistant_message_retracted":
        return Retracted(str(p.get("messageId", "")))
    if note.kind == "llm_retry":
        attempt = p.get("attempt")
        return Retrying(attempt if isinstance(attempt, int) else 0, str(p.get("reason", "")))
    if note.kind == "error":
        return TurnError(str(p.get("message", "droid reported an error")))
    if note.kind == "create_message":
        message = p.get("message")
        if isinstance(message, dict) and message.get("role") == "system":
            texts = [
                str(block.get("text", ""))
                for block in message.get("content", ())
                if isinstance(block, dict) and block.get("type") == "text"
            ]
            return Notice("\n".join(texts))
        return None
    if note.kind == "tool_call":
        use = p.get("toolUse")
        if isinstance(use, dict) and isinstance(use.get("id"), str) and isinstance(use.get("name"), str):
            return ToolCallSeen(use["id"], use["name"], use.get("input") if use.get("input") is not None else {})
        return None
    if note.kind == "agent_turn_completed":
        duration = p.get("durationMs")
        return TurnCompleted(
            str(p.get("reason", "")),
            Usage.from_droid(p.get("tokenUsage")),
            duration if isinstance(duration, int) else 0,
        )
    return None
