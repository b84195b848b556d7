"""OpenAI Responses: input items, response objects and their event stream, OpenAI's error envelope."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from droidpool import errors
from droidpool.core.model import (
    Attachment,
    Message,
    Output,
    ReasoningOut,
    Text,
    TextOut,
    ToolArgsOut,
    ToolCall,
    ToolCallOut,
    ToolResult,
    ToolSpec,
    TurnRequest,
    TurnResult,
)
from droidpool.core.turn import Turn
from droidpool.droid.protocol import Usage

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


# --- response objects ---------------------------------------------------------------------------


def usage_body(usage: Usage, standard_tokens: float | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cache_read_tokens},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.thinking_tokens},
        "total_tokens": usage.prompt_tokens + usage.output_tokens,
    }
    if standard_tokens is not None:  # droidpool's extension: what the usage ledger counts
        body["standard_tokens"] = round(standard_tokens, 3)
    return body


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def reasoning_item(item_id: str, text: str | None) -> dict[str, Any]:
    summary = [{"type": "summary_text", "text": text}] if text is not None else []
    return {"id": item_id, "type": "reasoning", "summary": summary}


def response_object(
    response_id: str, model: str, created: int, echo: Mapping[str, Any], *, status: str,
    output: list[dict[str, Any]], usage: Usage | None = None, error: dict[str, Any] | None = None,
    standard_tokens: float | None = None,
) -> dict[str, Any]:
    return {
        "id": response_id, "object": "response", "created_at": created, "status": status, "error": error,
        "incomplete_details": None, "instructions": echo.get("instructions"), "model": model, "output": output,
        "parallel_tool_calls": True, "previous_response_id": echo.get("previous_response_id"),
        "reasoning": echo.get("reasoning") or {"effort": None, "summary": None}, "store": echo.get("store", True),
        "temperature": None, "text": echo.get("text") or {"format": {"type": "text"}}, "tool_choice": "auto",
        "tools": [],
        "top_p": None, "truncation": "disabled", "usage": usage_body(usage, standard_tokens) if usage is not None else None,
        "user": None, "metadata": {},
    }


def call_item(item_id: str, call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call.id, "name": call.name,
            "arguments": call.arguments if status == "completed" else ""}


def call_item_id(turn_id: str, index: int) -> str:
    return f"fc_{turn_id}_{index}"


def completed(result: TurnResult, echo: Mapping[str, Any]) -> dict[str, Any]:
    """The whole response of a completed turn (the body, and ``GET /v1/responses/{id}``)."""
    output = []
    if result.reasoning:
        output.append(reasoning_item(f"rs_{result.turn_id}", result.reasoning))
    if result.text or not result.tool_calls:
        output.append(message_item(f"msg_{result.turn_id}", result.text))
    output += [call_item(call_item_id(result.turn_id, i), c) for i, c in enumerate(result.tool_calls)]
    return response_object(f"resp_{result.turn_id}", result.model, result.created, echo, status="completed",
                           output=output, usage=result.usage, standard_tokens=result.standard_tokens)


def stored(output: Mapping[str, Any]) -> dict[str, Any]:
    """A kept turn's response object, as it was returned."""
    return completed(TurnResult.from_json(output["result"]), output.get("echo") or {})


class ResponsesEncoder:
    """The Responses event stream (``response.created`` … ``response.completed``), or one response."""

    def __init__(self, turn: Turn, parsed: Parsed) -> None:
        self.turn_id = turn.turn_id
        self.id = f"resp_{turn.turn_id}"
        self.model = turn.request.model
        self.created = turn.created
        self.echo = parsed.turn.echo
        self.sequence = 0
        self.items: list[dict[str, Any]] = []  # finished output items
        self.open: dict[str, Any] | None = None  # the item being streamed
        self.text: list[str] = []
        self.tool_names: dict[int, tuple[str, str]] = {}  # tool call index → (call id, name)

    def event(self, name: str, **data: Any) -> Event:
        payload = {"type": name, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return Event(payload, name)

    def snapshot(self, status: str, **extra: Any) -> dict[str, Any]:
        return response_object(self.id, self.model, self.created, self.echo, status=status,
                               output=list(self.items), **extra)

    def start(self) -> list[Event]:
        return [self.event("response.created", response=self.snapshot("in_progress")),
                self.event("response.in_progress", response=self.snapshot("in_progress"))]

    def _item_id(self, prefix: str) -> str:
        return f"{prefix}_{self.turn_id}" if not self.items else f"{prefix}_{self.turn_id}_{len(self.items)}"

    def _open(self, kind: str) -> list[Event]:
        if self.open is not None and self.open["type"] == kind:
            return []
        events = self._close()
        index = len(self.items)
        if kind == "message":
            self.open = message_item(self._item_id("msg"), "", status="in_progress")
            return [*events,
                    self.event("response.output_item.added", output_index=index, item=self.open),
                    self.event("response.content_part.added", item_id=self.open["id"], output_index=index,
                               content_index=0, part={"type": "output_text", "text": "", "annotations": []})]
        self.open = reasoning_item(self._item_id("rs"), None)
        return [*events,
                self.event("response.output_item.added", output_index=index, item=self.open),
                self.event("response.reasoning_summary_part.added", item_id=self.open["id"], output_index=index,
                           summary_index=0, part={"type": "summary_text", "text": ""})]

    def _close(self) -> list[Event]:
        item, self.open = self.open, None
        if item is None:
            return []
        index, text = len(self.items), "".join(self.text)
        self.text = []
        if item["type"] == "message":
            done = message_item(item["id"], text)
            part = done["content"][0]
            events = [self.event("response.output_text.done", item_id=item["id"], output_index=index,
                                 content_index=0, text=text, logprobs=[]),
                      self.event("response.content_part.done", item_id=item["id"], output_index=index,
                                 content_index=0, part=part)]
        else:
            done = reasoning_item(item["id"], text)
            events = [self.event("response.reasoning_summary_text.done", item_id=item["id"], output_index=index,
                                 summary_index=0, text=text),
                      self.event("response.reasoning_summary_part.done", item_id=item["id"], output_index=index,
                                 summary_index=0, part=done["summary"][0])]
        self.items.append(done)
        return [*events, self.event("response.output_item.done", output_index=index, item=done)]

    def _call(self, output: ToolArgsOut) -> list[Event]:
        """A function_call item whole: it is streamed once its arguments are known."""
        events = self._close()
        call_id, name = self.tool_names[output.index]
        call = ToolCall(call_id, name, output.arguments)
        item_id, index = call_item_id(self.turn_id, output.index), len(self.items)
        done = call_item(item_id, call)
        self.items.append(done)
        return [*events,
                self.event("response.output_item.added", output_index=index, item=call_item(item_id, call, "in_progress")),
                self.event("response.function_call_arguments.delta", item_id=item_id, output_index=index,
                           delta=output.arguments),
                self.event("response.function_call_arguments.done", item_id=item_id, output_index=index,
                           arguments=output.arguments),
                self.event("response.output_item.done", output_index=index, item=done)]

    def feed(self, output: Output) -> list[Event]:
        if isinstance(output, ToolCallOut):
            self.tool_names[output.index] = (output.id, output.name)
            return []
        if isinstance(output, ToolArgsOut):
            return self._call(output)
        kind = "message" if isinstance(output, TextOut) else "reasoning"
        events = self._open(kind)
        assert self.open is not None
        self.text.append(output.text)
        index = len(self.items)
        if isinstance(output, TextOut):
            return [*events, self.event("response.output_text.delta", item_id=self.open["id"], output_index=index,
                                        content_index=0, delta=output.text, logprobs=[])]
        assert isinstance(output, ReasoningOut)
        return [*events, self.event("response.reasoning_summary_text.delta", item_id=self.open["id"],
                                    output_index=index, summary_index=0, delta=output.text)]

    def keepalive(self) -> list[Event]:
        return [COMMENT]

    def finish(self, result: TurnResult) -> list[Event]:
        events = self._close() if self.items or self.open else []
        if not any(i["type"] in ("message", "function_call") for i in self.items):
            events += [*self._open("message"), *self._close()]  # every response has a message or calls
        return [*events, self.event("response.completed", response=self.snapshot("completed", usage=result.usage,
                                                                          standard_tokens=result.standard_tokens))]

    def failed(self, error: errors.DroidpoolError) -> list[Event]:
        detail = {"code": error.error_code or error.kind, "message": error.message}
        return [*self._close(), self.event("response.failed", response=self.snapshot("failed", error=detail))]

    def body(self, result: TurnResult) -> dict[str, Any]:
        return completed(result, self.echo)


def error_body(error: errors.DroidpoolError) -> tuple[int, dict[str, Any]]:
    return error.status, {"error": openai_wire.error_object(error, PARAMS)}


DIALECT = Dialect("responses", parse, ResponsesEncoder, error_body)
