"""Anthropic Messages responses: message events streamed or one message, and Anthropic's error envelope."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from droidpool import errors
from droidpool.core.model import (
    Output,
    ReasoningOut,
    TextOut,
    ToolArgsOut,
    ToolCallOut,
    TurnResult,
    Usage,
)
from droidpool.core.turn import Turn

from ..dialect import (
    Event,
    Parsed,
)

# --- outputs → message events ---------------------------------------------------------------------


def usage_body(usage: Usage, standard_tokens: float | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_creation_input_tokens": usage.cache_creation_tokens,
        "cache_read_input_tokens": usage.cache_read_tokens,
    }
    if standard_tokens is not None:  # droidpool's extension: what the usage ledger counts
        body["standard_tokens"] = round(standard_tokens, 3)
    return body


def signature(turn_id: str, thinking: str) -> str:
    """An opaque signature for a thinking block (clients must send one back; droid never reads it)."""
    return "droidpool-" + hashlib.sha256(f"{turn_id}\0{thinking}".encode()).hexdigest()[:32]


class MessagesEncoder:
    """Anthropic's named events (message_start … message_stop), or one message."""

    def __init__(self, turn: Turn, parsed: Parsed) -> None:
        self.id = f"msg_{turn.turn_id}"
        self.turn_id = turn.turn_id
        self.model = turn.request.model
        self.index = -1
        self.block: str | None = None  # the open block's type
        self.thinking: list[str] = []
        self.tool_names: dict[int, tuple[str, str]] = {}  # tool call index → (id, name)

    @staticmethod
    def event(name: str, **data: Any) -> Event:
        return Event({"type": name, **data}, name)

    def start(self) -> list[Event]:
        message: dict[str, Any] = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": usage_body(Usage())}
        return [self.event("message_start", message=message), self.event("ping")]

    def _open(self, kind: str, block: dict[str, Any] | None = None) -> list[Event]:
        if self.block == kind and block is None:
            return []
        events = self._close()
        self.index += 1
        self.block = kind
        if block is None:
            block = {"type": "text", "text": ""} if kind == "text" else {"type": "thinking", "thinking": "", "signature": ""}
        return [*events, self.event("content_block_start", index=self.index, content_block=block)]

    def _close(self) -> list[Event]:
        if self.block is None:
            return []
        events = []
        if self.block == "thinking":
            sig = signature(self.turn_id, "".join(self.thinking))
            events.append(self.event("content_block_delta", index=self.index,
                                     delta={"type": "signature_delta", "signature": sig}))
            self.thinking = []
        self.block = None
        return [*events, self.event("content_block_stop", index=self.index)]

    def feed(self, output: Output) -> list[Event]:
        if isinstance(output, TextOut):
            return [*self._open("text"), self.event("content_block_delta", index=self.index,
                                                    delta={"type": "text_delta", "text": output.text})]
        if isinstance(output, ToolCallOut):  # its block opens with its input: blocks never interleave
            self.tool_names[output.index] = (output.id, output.name)
            return []
        if isinstance(output, ToolArgsOut):
            call_id, name = self.tool_names[output.index]
            return [*self._open("tool_use", {"type": "tool_use", "id": call_id, "name": name, "input": {}}),
                    self.event("content_block_delta", index=self.index,
                               delta={"type": "input_json_delta", "partial_json": output.arguments}),
                    *self._close()]
        assert isinstance(output, ReasoningOut)
        self.thinking.append(output.text)
        return [*self._open("thinking"), self.event("content_block_delta", index=self.index,
                                                    delta={"type": "thinking_delta", "thinking": output.text})]

    def keepalive(self) -> list[Event]:
        return [self.event("ping")]

    def finish(self, result: TurnResult) -> list[Event]:
        opened = [] if self.index >= 0 else self._open("text")  # every message has a text block
        return [
            *opened, *self._close(),
            self.event("message_delta", delta={"stop_reason": stop_reason(result), "stop_sequence": None},
                       usage=usage_body(result.usage, result.standard_tokens)),
            self.event("message_stop"),
        ]

    def failed(self, error: errors.DroidpoolError) -> list[Event]:
        return [Event(error_body(error)[1], "error")]

    def body(self, result: TurnResult) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if result.reasoning:
            content.append({"type": "thinking", "thinking": result.reasoning,
                            "signature": signature(self.turn_id, result.reasoning)})
        if result.text or not result.tool_calls:
            content.append({"type": "text", "text": result.text})
        content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": orjson.loads(c.arguments)}
                    for c in result.tool_calls]
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop_reason(result), "stop_sequence": None,
                "usage": usage_body(result.usage, result.standard_tokens)}


def stop_reason(result: TurnResult) -> str:
    return "tool_use" if result.stop == "tool_calls" else "end_turn"


# --- errors -----------------------------------------------------------------------------------------

# Neutral kinds → Anthropic's error type, and the status where Anthropic's differs.
TYPES: dict[errors.ErrorKind, str] = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "permission": "permission_error",
    "not_found": "not_found_error",
    "method_not_allowed": "invalid_request_error",
    "request_timeout": "timeout_error",
    "conflict": "invalid_request_error",
    "misdirected": "invalid_request_error",
    "too_large": "request_too_large",
    "unsupported_media_type": "invalid_request_error",
    "rate_limit": "rate_limit_error",
    "quota": "rate_limit_error",  # Anthropic has no quota type; its clients know 429 rate_limit_error
    "upstream": "api_error",
    "unavailable": "overloaded_error",
    "timeout": "timeout_error",
    "internal": "api_error",
}
STATUSES: dict[errors.ErrorKind, int] = {"unavailable": 529}


def error_body(error: errors.DroidpoolError) -> tuple[int, dict[str, Any]]:
    detail: dict[str, Any] = {"type": TYPES[error.kind], "message": error.message}
    return STATUSES.get(error.kind, error.status), {"type": "error", "error": detail}
