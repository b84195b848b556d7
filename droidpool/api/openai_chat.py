"""OpenAI chat-completions wire format: request validation and the fold of droid events into chunks."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from droidpool import errors
from droidpool.config import REASONING_EFFORTS
from droidpool.core.conversation import ChatMessage
from droidpool.droid.protocol import (
    Notice,
    Retracted,
    Retrying,
    TextDelta,
    ThinkingDelta,
    TurnCompleted,
    TurnError,
    TurnEvent,
    Usage,
)

ROLES = ("system", "developer", "user", "assistant", "tool")

# Accepted and ignored: droid (or the upstream behind it) decides these. Listed back to the
# client in the X-Droidpool-Ignored-Params header.
IGNORED_PARAMS = frozenset({
    "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "presence_penalty",
    "frequency_penalty", "seed", "user", "metadata", "parallel_tool_calls", "service_tier",
    "store", "tools", "functions", "logit_bias", "prediction", "modalities", "top_k",
    "prompt_cache_key", "safety_identifier", "verbosity",
})
# Refused: ignoring them would change what the client gets back.
KNOWN_PARAMS = frozenset({
    "model", "messages", "stream", "stream_options", "reasoning_effort", "session_id", "n",
    "logprobs", "top_logprobs", "response_format", "tool_choice", "function_call", "audio",
    "web_search_options",
}) | IGNORED_PARAMS


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[ChatMessage, ...]
    stream: bool = False
    include_usage: bool = False
    reasoning_effort: str | None = None
    session_id: str | None = None
    ignored: tuple[str, ...] = ()


def parse_chat_request(body: Any, header_session_id: str | None = None) -> ChatRequest:
    """Validate a chat-completions body; every problem is an InvalidRequest naming its param."""
    if not isinstance(body, Mapping):
        raise errors.InvalidRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise errors.InvalidRequest("'model' is required and must be a non-empty string.", param="model")
    messages = _parse_messages(body.get("messages"))
    stream = _optional(body, "stream", bool, False)
    options = _optional(body, "stream_options", Mapping, None)
    include_usage = False
    if options is not None:
        include_usage = _optional(options, "include_usage", bool, False, "stream_options.include_usage")
    effort = _optional(body, "reasoning_effort", str, None)
    if effort is not None and effort not in REASONING_EFFORTS:
        raise errors.InvalidRequest(
            f"'reasoning_effort' must be one of {', '.join(REASONING_EFFORTS)}.", param="reasoning_effort"
        )
    session_id = _optional(body, "session_id", str, None) or header_session_id
    n = body.get("n")
    if n not in (None, 1):
        raise errors.InvalidRequest("Only n=1 is supported: droid produces one answer per turn.", param="n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise errors.InvalidRequest("droid does not expose log probabilities.", param="logprobs")
    response_format = body.get("response_format")
    if response_format is not None and not (
        isinstance(response_format, Mapping) and response_format.get("type") == "text"
    ):
        raise errors.InvalidRequest(
            "Only response_format {\"type\": \"text\"} is supported.", param="response_format"
        )
    tool_choice = body.get("tool_choice", body.get("function_call"))
    if tool_choice not in (None, "none", "auto"):
        raise errors.InvalidRequest(
            "Client-side tool calls are not supported: droid runs its own tools.", param="tool_choice"
        )
    for name in ("audio", "web_search_options"):
        if body.get(name) is not None:
            raise errors.InvalidRequest(f"'{name}' is not supported.", param=name)
    ignored = tuple(sorted(k for k in body if k in IGNORED_PARAMS or k not in KNOWN_PARAMS))
    return ChatRequest(model.strip(), messages, stream, include_usage, effort, session_id, ignored)


def _optional(body: Mapping[str, Any], key: str, kind: type, default: Any, param: str | None = None) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise errors.InvalidRequest(f"'{param or key}' has the wrong type.", param=param or key)
    return value


def _parse_messages(raw: Any) -> tuple[ChatMessage, ...]:
    if not isinstance(raw, list) or not raw:
        raise errors.InvalidRequest("'messages' must be a non-empty array.", param="messages")
    out: list[ChatMessage] = []
    for index, message in enumerate(raw):
        param = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise errors.InvalidRequest(f"'{param}' must be an object.", param=param)
        role = message.get("role")
        if role not in ROLES:
            raise errors.InvalidRequest(
                f"'{param}.role' must be one of {', '.join(ROLES)}.", param=f"{param}.role"
            )
        text = _content_text(message.get("content"), f"{param}.content", role)
        out.append(ChatMessage("system" if role == "developer" else role, text))
    if out[-1].role != "user":
        raise errors.InvalidRequest(
            "The last message must be from the user: droid answers a user turn.",
            param=f"messages[{len(out) - 1}].role",
        )
    return tuple(out)


def _content_text(content: Any, param: str, role: str) -> str:
    if content is None:
        if role == "assistant":
            return ""
        raise errors.InvalidRequest(f"'{param}' is required.", param=param)
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
                raise errors.InvalidRequest(f"'{param}[{index}]' must be a content part object.", param=param)
            if part["type"] in ("text", "input_text", "output_text"):
                text = part.get("text")
                if not isinstance(text, str):
                    raise errors.InvalidRequest(f"'{param}[{index}].text' must be a string.", param=param)
                texts.append(text)
            else:
                raise errors.InvalidRequest(
                    f"Content part type {part['type']!r} is not supported; send text.", param=param
                )
        return "".join(texts)
    raise errors.InvalidRequest(f"'{param}' must be a string or an array of content parts.", param=param)


# --- droid events → OpenAI chunks -----------------------------------------------------------

# agent_turn_completed reasons for failed turns → the error a client sees.
_FAILURES: dict[str, type[errors.DroidpoolError]] = {
    "model_rate_limited": errors.Overloaded,
    "model_provider_unreachable": errors.UpstreamError,
    "model_provider_unavailable": errors.UpstreamError,
    "model_authentication_failed": errors.UpstreamError,
}


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.input_tokens + usage.cache_read_tokens + usage.cache_creation_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.cache_read_tokens + usage.cache_creation_tokens
        + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cache_read_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.thinking_tokens},
    }


@dataclass
class _MessageText:
    text: str = ""  # droid's current text for the message; a retraction empties it
    sent: str = ""  # what a streaming client has been given for it
    replay: int | None = None  # after a retraction: how much of ``sent`` the retry has re-sent


@dataclass
class Fold:
    """One turn's droid events folded into OpenAI deltas and, at the end, a result.

    Both the streaming and the non-streaming responses are built from this fold. Retracted
    text that droid re-streams on a retry is matched against what was already sent, so a
    streaming client never receives it twice; the final text (non-streaming) is droid's text
    after its last retraction. A retry that says something else than the retracted text
    cannot be unsent from a stream: the stream then carries both.
    """

    completion_id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    reasoning: list[str] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    completed: TurnCompleted | None = None
    problems: list[str] = field(default_factory=list)
    _messages: dict[str, _MessageText] = field(default_factory=dict)
    _last_message: str | None = None

    def feed(self, event: TurnEvent) -> list[dict[str, Any]]:
        """Deltas to send for ``event`` (each a ``choices[0].delta`` object)."""
        if isinstance(event, TextDelta):
            text = self._fresh_text(event.message_id, event.text)
            return [{"content": text}] if text else []
        if isinstance(event, ThinkingDelta):
            if not event.text:
                return []
            self.reasoning.append(event.text)
            return [{"reasoning_content": event.text}]
        if isinstance(event, Retracted):
            state = self._messages.get(event.message_id)
            if state is not None:
                state.text = ""
                state.replay = 0
            return []
        if isinstance(event, TurnError | Notice):
            text = event.message if isinstance(event, TurnError) else event.text
            if text and text not in self.problems:
                self.problems.append(text)
            return []
        if isinstance(event, TurnCompleted):
            self.completed = event
            self.usage = event.usage
            return []
        assert isinstance(event, Retrying)
        return []

    def _fresh_text(self, message_id: str, text: str) -> str:
        state = self._messages.setdefault(message_id, _MessageText())
        state.text += text
        separator = ""
        if self._last_message is not None and self._last_message != message_id and not state.sent:
            separator = "\n\n"
        self._last_message = message_id
        if state.replay is not None:
            already = state.sent[state.replay :]
            common = 0
            while common < min(len(already), len(text)) and already[common] == text[common]:
                common += 1
            state.replay += common
            if common == len(text):
                return ""
            # The retry diverges from, or runs past, what was sent: send only what is new.
            state.replay = None
            text = text[common:]
        state.sent += text
        return separator + text

    @property
    def text(self) -> str:
        return "\n\n".join(m.text for m in self._messages.values() if m.text)

    def failure(self) -> errors.DroidpoolError | None:
        """The error to report if the turn failed (None when it completed)."""
        reason = self.completed.reason if self.completed else "incomplete"
        if reason == "completed":
            return None
        detail = "; ".join(self.problems) or f"droid ended the turn: {reason}"
        return _FAILURES.get(reason, errors.UpstreamError)(detail, code=f"droid_{reason}")

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }

    def usage_chunk(self) -> dict[str, Any]:
        return {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [],
            "usage": usage_body(self.usage),
        }

    def completion(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.text, "refusal": None}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        return {
            "id": self.completion_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
            "usage": usage_body(self.usage),
        }
