"""OpenAI Responses: response objects, their event stream, and OpenAI's error envelope."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from droidpool import errors
from droidpool.core.model import (
    Output,
    ReasoningOut,
    TextOut,
    ToolArgsOut,
    ToolCall,
    ToolCallOut,
    TurnResult,
    Usage,
)
from droidpool.core.turn import Turn

from .. import openai_wire
from ..dialect import (
    COMMENT,
    Event,
    Parsed,
)
from .request import PARAMS

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
