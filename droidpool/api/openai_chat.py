"""OpenAI Chat Completions: request parsing, chunks and completions, the OpenAI error envelope."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from droidpool import errors
from droidpool.core.model import (
    Attachment,
    Message,
    Output,
    OutputFormat,
    Part,
    ReasoningOut,
    Role,
    Text,
    TextOut,
    ToolArgsOut,
    ToolCall,
    ToolCallOut,
    ToolResult,
    ToolSpec,
    TurnRequest,
    TurnResult,
    Usage,
)
from droidpool.core.turn import Turn

from . import openai_wire
from .dialect import (
    COMMENT,
    OWN_PARAMS,
    Dialect,
    Event,
    Parsed,
    check_effort,
    conversation_key,
    header_effort,
    optional,
    session_id,
)

ROLES = ("system", "developer", "user", "assistant", "tool")

# Accepted and ignored: droid (or the upstream behind it) decides these. Listed back to the
# client in the X-Droidpool-Ignored-Params header.
IGNORED_PARAMS = frozenset({
    "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "presence_penalty",
    "frequency_penalty", "seed", "user", "metadata", "service_tier",
    "store", "logit_bias", "prediction", "modalities", "top_k",
    "prompt_cache_key", "safety_identifier", "verbosity",
})
# Refused: ignoring them would change what the client gets back.
KNOWN_PARAMS = frozenset({
    "model", "messages", "stream", "stream_options", "reasoning_effort", "n",
    "logprobs", "top_logprobs", "response_format", "tool_choice", "function_call", "audio",
    "web_search_options", "tools", "functions", "parallel_tool_calls",
}) | IGNORED_PARAMS | OWN_PARAMS


def parse(body: Any, headers: Mapping[str, str]) -> Parsed:
    """Validate a chat-completions body; every problem is an InvalidRequest naming its param."""
    if not isinstance(body, Mapping):
        raise errors.InvalidRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise errors.InvalidRequest("'model' is required and must be a non-empty string.", param="model")
    system, messages = _parse_messages(body.get("messages"))
    stream = optional(body, "stream", bool, False)
    options = optional(body, "stream_options", Mapping, None)
    include_usage = False
    if options is not None:
        include_usage = optional(options, "include_usage", bool, False, "stream_options.include_usage")
    effort = optional(body, "reasoning_effort", str, None)
    if effort is not None:
        check_effort(effort, "reasoning_effort")
    else:
        effort = header_effort(headers)
    n = body.get("n")
    if n not in (None, 1):
        raise errors.InvalidRequest("Only n=1 is supported: droid produces one answer per turn.", param="n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise errors.InvalidRequest("droid does not expose log probabilities.", param="logprobs")
    output_format = _response_format(body.get("response_format"))
    tools = _tools(body)
    tool_choice = openai_wire.tool_choice_of(body.get("tool_choice", body.get("function_call")), "tool_choice")
    if body.get("parallel_tool_calls") is False:
        raise errors.InvalidRequest("parallel_tool_calls=false cannot be honoured: the model may call several "
                                    "tools at once.", param="parallel_tool_calls")
    for name in ("audio", "web_search_options"):
        if body.get(name) is not None:
            raise errors.InvalidRequest(f"'{name}' is not supported.", param=name)
    ignored = tuple(sorted(k for k in body if k in IGNORED_PARAMS or k not in KNOWN_PARAMS))
    request = TurnRequest(
        model=model.strip(), messages=messages, system=system, stream=stream, reasoning_effort=effort,
        session_id=session_id(body, headers), conversation_key=conversation_key(body, headers),
        tools=tools, tool_choice=tool_choice, output_format=output_format, dialect="openai", ignored=ignored,
    )
    return Parsed(request, {"include_usage": include_usage})


def _response_format(raw: Any) -> OutputFormat | None:
    """``response_format``: text, json_object, or json_schema ``{"json_schema": {name, schema, strict}}``."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise errors.InvalidRequest("'response_format' must be an object.", param="response_format")
    spec = raw.get("json_schema")
    if raw.get("type") == "json_schema" and not isinstance(spec, Mapping):
        raise errors.InvalidRequest("'response_format.json_schema' must be an object with a schema.",
                                    param="response_format.json_schema")
    return openai_wire.json_format(raw.get("type"), spec or {}, "response_format.json_schema"
                                   if raw.get("type") == "json_schema" else "response_format")


def _tools(body: Mapping[str, Any]) -> tuple[ToolSpec, ...]:
    """``tools`` (functions) and the legacy ``functions``, as the client defines them."""
    raw = body.get("tools") or []
    if not isinstance(raw, list):
        raise errors.InvalidRequest("'tools' must be an array.", param="tools")
    defs = []
    for index, tool in enumerate(raw):
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(tool.get("function"), Mapping):
            raise errors.InvalidRequest(f"'tools[{index}]' must be a function tool.", param=f"tools[{index}]")
        defs.append((f"tools[{index}]", tool["function"]))
    legacy = body.get("functions") or []
    if not isinstance(legacy, list):
        raise errors.InvalidRequest("'functions' must be an array.", param="functions")
    defs += [(f"functions[{i}]", f) for i, f in enumerate(legacy)]
    return tuple(openai_wire.tool_spec(f, where, "parameters") for where, f in defs)


def _parse_messages(raw: Any) -> tuple[str, tuple[Message, ...]]:
    """The system prompt (system and developer messages) and the other messages."""
    if not isinstance(raw, list) or not raw:
        raise errors.InvalidRequest("'messages' must be a non-empty array.", param="messages")
    system: list[str] = []
    out: list[Message] = []
    last_role = ""
    for index, message in enumerate(raw):
        param = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise errors.InvalidRequest(f"'{param}' must be an object.", param=param)
        role = message.get("role")
        if role not in ROLES:
            raise errors.InvalidRequest(
                f"'{param}.role' must be one of {', '.join(ROLES)}.", param=f"{param}.role"
            )
        last_role = role
        text, attached = _content(message.get("content"), f"{param}.content", role)
        if attached and role in ("system", "developer", "assistant"):
            raise errors.InvalidRequest(f"'{param}.content': only user and tool messages may hold images or files.",
                                        param=attached[0].where)
        if role in ("system", "developer"):
            system.append(text)
            continue
        parts: list[Part] = [Text(text), *attached]
        if role == "assistant":
            parts += _tool_calls(message.get("tool_calls"), f"{param}.tool_calls")
        if role == "tool":
            call_id = message.get("tool_call_id")
            parts = [ToolResult(call_id if isinstance(call_id, str) else "", text, attachments=tuple(attached))]
        neutral_role: Role = role
        out.append(Message(neutral_role, tuple(parts)))
    if last_role not in ("user", "tool"):
        raise errors.InvalidRequest(
            "The last message must be from the user (or tool results): droid answers a user turn.",
            param=f"messages[{len(raw) - 1}].role",
        )
    return "\n\n".join(system), tuple(out)


def _tool_calls(raw: Any, param: str) -> list[Part]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise errors.InvalidRequest(f"'{param}' must be an array.", param=param)
    calls: list[Part] = []
    for index, call in enumerate(raw):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise errors.InvalidRequest(f"'{param}[{index}]' must be a function tool call.", param=param)
        arguments = function.get("arguments")
        calls.append(ToolCall(str(call.get("id") or ""), function["name"],
                              arguments if isinstance(arguments, str) else "{}"))
    return calls


def _content(content: Any, param: str, role: str) -> tuple[str, list[Attachment]]:
    """A message's text, and the images and files it attaches, in order."""
    if content is None:
        if role == "assistant":
            return "", []
        raise errors.InvalidRequest(f"'{param}' is required.", param=param)
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise errors.InvalidRequest(f"'{param}' must be a string or an array of content parts.", param=param)
    texts: list[str] = []
    attached: list[Attachment] = []
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
            raise errors.InvalidRequest(f"'{where}' must be a content part object.", param=where)
        kind = part["type"]
        if kind in ("text", "input_text", "output_text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise errors.InvalidRequest(f"'{where}.text' must be a string.", param=where)
            texts.append(text)
        elif kind == "refusal" and role == "assistant":
            texts.append(str(part.get("refusal", "")))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, Mapping) else image
            attached.append(openai_wire.image_attachment(url, None, f"{where}.image_url"))
        elif kind == "file":
            spec = part.get("file")
            if not isinstance(spec, Mapping):
                raise errors.InvalidRequest(f"'{where}.file' must be an object.", param=where)
            attached.append(openai_wire.file_attachment(spec.get("file_data"), None, spec.get("file_id"),
                                                        spec.get("filename"), f"{where}.file"))
        else:
            raise errors.InvalidRequest(f"Content part type {kind!r} is not supported; send text, image_url or "
                                        "file parts.", param=where)
    return "".join(texts), attached


# --- outputs → chunks -----------------------------------------------------------------------------


def usage_body(usage: Usage, standard_tokens: float | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.prompt_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cache_read_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.thinking_tokens},
    }
    if standard_tokens is not None:  # droidpool's extension: what the usage ledger counts
        body["standard_tokens"] = round(standard_tokens, 3)
    return body


class ChatEncoder:
    """Chat-completion chunks (``data:`` lines ending with ``[DONE]``) or one completion."""

    def __init__(self, turn: Turn, parsed: Parsed) -> None:
        self.id = f"chatcmpl-{turn.turn_id}"
        self.model = turn.request.model
        self.created = turn.created
        self.include_usage = bool(parsed.options.get("include_usage"))

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }

    def start(self) -> list[Event]:
        return [Event(self.chunk({"role": "assistant", "content": ""}))]

    def feed(self, output: Output) -> list[Event]:
        if isinstance(output, TextOut):
            return [Event(self.chunk({"content": output.text}))]
        if isinstance(output, ReasoningOut):
            return [Event(self.chunk({"reasoning_content": output.text}))]
        if isinstance(output, ToolCallOut):  # the name first, then the arguments
            return [Event(self.chunk({"tool_calls": [{"index": output.index, "id": output.id, "type": "function",
                                                      "function": {"name": output.name, "arguments": ""}}]}))]
        assert isinstance(output, ToolArgsOut)
        return [Event(self.chunk({"tool_calls": [{"index": output.index,
                                                  "function": {"arguments": output.arguments}}]}))]

    def keepalive(self) -> list[Event]:
        return [COMMENT]

    def finish(self, result: TurnResult) -> list[Event]:
        events = [Event(self.chunk({}, finish_reason=finish_reason(result)))]
        if self.include_usage:
            events.append(Event({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": [], "usage": usage_body(result.usage, result.standard_tokens),
            }))
        return [*events, Event("[DONE]")]

    def failed(self, error: errors.DroidpoolError) -> list[Event]:
        # The 200 is already sent: the error goes in-band, then the stream ends normally.
        return [Event(openai_wire.error_body(error)[1]), Event("[DONE]")]

    def body(self, result: TurnResult) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": result.text, "refusal": None}
        if result.reasoning:
            message["reasoning_content"] = result.reasoning
        if result.tool_calls:
            message["content"] = result.text or None
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}} for c in result.tool_calls]
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(result)}],
            "usage": usage_body(result.usage, result.standard_tokens),
        }


def finish_reason(result: TurnResult) -> str:
    return "tool_calls" if result.stop == "tool_calls" else "stop"


DIALECT = Dialect("openai", parse, ChatEncoder, openai_wire.error_body)
