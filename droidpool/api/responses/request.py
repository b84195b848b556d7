"""OpenAI Responses requests: input items read into a neutral turn request; response ids."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from droidpool import errors
from droidpool.core.model import (
    Attachment,
    Message,
    Text,
    ToolCall,
    ToolResult,
    ToolSpec,
    TurnRequest,
)

from .. import openai_wire
from ..dialect import (
    OWN_PARAMS,
    Parsed,
    check_effort,
    conversation_key,
    header_effort,
    optional,
    session_id,
)

IGNORED_PARAMS = frozenset({
    "include", "max_output_tokens", "max_tool_calls", "metadata", "temperature",
    "top_p", "top_logprobs", "truncation", "user", "service_tier", "prompt_cache_key", "safety_identifier",
    "client_metadata", "stream_options", "tools",
})
KNOWN_PARAMS = frozenset({
    "model", "input", "instructions", "previous_response_id", "store", "stream", "reasoning", "text",
    "tool_choice", "background", "conversation", "prompt", "parallel_tool_calls",
}) | IGNORED_PARAMS | OWN_PARAMS
TEXT_PARTS = ("input_text", "output_text", "text")
RESPONSE_ID = re.compile(r"^resp_([0-9a-f]{32})$")
# Neutral param names → the ones this API uses.
PARAMS = {"previous_turn": "previous_response_id"}


def turn_id_of(response_id: str, param: str = "previous_response_id") -> str:
    """The turn behind a ``resp_…`` id; any other id names no stored response (404)."""
    match = RESPONSE_ID.match(response_id)
    if match is None:
        raise errors.ResponseNotFound(f"No response {response_id!r}.", param=param)
    return match.group(1)


def parse(body: Any, headers: Mapping[str, str]) -> Parsed:
    if not isinstance(body, Mapping):
        raise errors.InvalidRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise errors.InvalidRequest("'model' is required and must be a non-empty string.", param="model")
    for name in ("background", "conversation", "prompt"):
        if body.get(name):
            raise errors.InvalidRequest(f"'{name}' is not supported.", param=name)
    instructions = optional(body, "instructions", str, "")
    developer, messages = _input(body.get("input"))
    system = "\n\n".join(t for t in (instructions, *developer) if t)
    stream = optional(body, "stream", bool, False)
    store = optional(body, "store", bool, True)
    reasoning = optional(body, "reasoning", Mapping, {})
    effort = reasoning.get("effort")
    if effort is not None:
        if not isinstance(effort, str):
            raise errors.InvalidRequest("'reasoning.effort' must be a string.", param="reasoning.effort")
        check_effort(effort, "reasoning.effort")
    else:
        effort = header_effort(headers)
    text = optional(body, "text", Mapping, {})
    fmt = text.get("format")
    if fmt is not None and not isinstance(fmt, Mapping):
        raise errors.InvalidRequest("'text.format' must be an object.", param="text.format")
    output_format = openai_wire.json_format(fmt.get("type"), fmt, "text.format") if fmt is not None else None
    tool_choice = openai_wire.tool_choice_of(body.get("tool_choice"), "tool_choice")
    if body.get("parallel_tool_calls") is False:
        raise errors.InvalidRequest("parallel_tool_calls=false cannot be honoured: the model may call several "
                                    "tools at once.", param="parallel_tool_calls")
    previous = optional(body, "previous_response_id", str, None)
    ignored = {k for k in body if k in IGNORED_PARAMS or k not in KNOWN_PARAMS}
    tools, unsupported = _tools(body.get("tools"))
    ignored |= unsupported
    if text.get("verbosity") is not None:
        ignored.add("text.verbosity")
    echo = {"instructions": instructions or None, "previous_response_id": previous, "store": store,
            "reasoning": {"effort": effort, "summary": reasoning.get("summary")},
            "text": {"format": dict(fmt) if fmt is not None else {"type": "text"}}}
    request = TurnRequest(
        model=model.strip(), messages=messages, system=system, stream=stream, reasoning_effort=effort,
        session_id=session_id(body, headers), conversation_key=conversation_key(body, headers),
        previous_turn_id=turn_id_of(previous) if previous else None, keep_output=store,
        tools=tools, tool_choice=tool_choice, output_format=output_format, dialect="responses",
        ignored=tuple(sorted(ignored)), echo=echo,
    )
    return Parsed(request)


def _tools(raw: Any) -> tuple[tuple[ToolSpec, ...], set[str]]:
    """Function tools, and the types droid has no counterpart for (web_search, custom, namespace,
    ...: Codex sends them), named for the ignored-params header."""
    if raw is None:
        return (), set()
    if not isinstance(raw, list):
        raise errors.InvalidRequest("'tools' must be an array.", param="tools")
    specs, unsupported = [], set()
    for index, tool in enumerate(raw):
        if not isinstance(tool, Mapping):
            raise errors.InvalidRequest(f"'tools[{index}]' must be an object.", param=f"tools[{index}]")
        if tool.get("type") == "function":
            specs.append(openai_wire.tool_spec(tool, f"tools[{index}]", "parameters"))
        else:
            unsupported.add(f"tools[{tool.get('type')}]")
    return tuple(specs), unsupported


def _input(raw: Any) -> tuple[list[str], tuple[Message, ...]]:
    """Developer and system texts (they join the instructions), and the conversation."""
    if isinstance(raw, str):
        if not raw:
            raise errors.InvalidRequest("'input' must not be empty.", param="input")
        return [], (Message.of("user", raw),)
    if not isinstance(raw, list) or not raw:
        raise errors.InvalidRequest("'input' must be a string or a non-empty array of items.", param="input")
    developer: list[str] = []
    out: list[Message] = []
    for index, item in enumerate(raw):
        param = f"input[{index}]"
        if not isinstance(item, Mapping):
            raise errors.InvalidRequest(f"'{param}' must be an object.", param=param)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise errors.InvalidRequest(f"'{param}.role' must be user, assistant, system or developer.",
                                            param=f"{param}.role")
            text, attached = _content(item.get("content"), f"{param}.content")
            if attached and role != "user":
                raise errors.InvalidRequest(f"'{param}.content': only user messages may hold images or files.",
                                            param=attached[0].where)
            if role in ("system", "developer"):
                developer.append(text)
            else:
                out.append(Message(role, (Text(text), *attached)))
        elif kind in ("function_call", "custom_tool_call"):
            call_id, name = item.get("call_id"), item.get("name")
            arguments = item.get("arguments" if kind == "function_call" else "input", "")
            if not isinstance(call_id, str) or not isinstance(name, str) or not isinstance(arguments, str):
                raise errors.InvalidRequest(f"'{param}' needs a call_id, a name and string arguments.", param=param)
            out.append(Message("assistant", (ToolCall(call_id, name, arguments),)))
        elif kind in ("function_call_output", "custom_tool_call_output"):
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise errors.InvalidRequest(f"'{param}.call_id' must be a string.", param=param)
            output = item.get("output")
            result, attached = (output, []) if isinstance(output, str) else _content(output, f"{param}.output")
            out.append(Message("tool", (ToolResult(call_id, result, attachments=tuple(attached)),)))
        elif kind == "reasoning":
            continue  # droid keeps its own reasoning; a client's copy is accepted and not resent
        else:
            raise errors.InvalidRequest(f"Input item type {kind!r} is not supported.", param=f"{param}.type")
    split_at = max((i for i, m in enumerate(out) if m.role == "assistant"), default=-1)
    if not out[split_at + 1:]:
        raise errors.InvalidRequest("The input must end with a user message or a tool output: "
                                    "droid answers a user turn.", param="input")
    return developer, tuple(out)


def _content(content: Any, param: str) -> tuple[str, list[Attachment]]:
    """A message's (or a tool output's) text, and the images and files it attaches, in order."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise errors.InvalidRequest(f"'{param}' must be a string or an array of content parts.", param=param)
    texts: list[str] = []
    attached: list[Attachment] = []
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in TEXT_PARTS and isinstance(part, Mapping) and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part, Mapping):
            texts.append(str(part.get("refusal", "")))
        elif kind == "input_image" and isinstance(part, Mapping):
            attached.append(openai_wire.image_attachment(part.get("image_url"), part.get("file_id"), where))
        elif kind == "input_file" and isinstance(part, Mapping):
            attached.append(openai_wire.file_attachment(part.get("file_data"), part.get("file_url"),
                                                        part.get("file_id"), part.get("filename"), where))
        else:
            raise errors.InvalidRequest(f"Content part type {kind!r} is not supported; send input_text, input_image "
                                        "or input_file.", param=where)
    return "".join(texts), attached
