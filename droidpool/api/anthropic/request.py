"""Anthropic Messages requests: the body and its blocks read into a neutral turn request."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

import orjson

from droidpool import errors
from droidpool.core import attachments, structured, tokens
from droidpool.core.catalog import Listed
from droidpool.core.model import (
    Attachment,
    AttachmentKind,
    Message,
    OutputFormat,
    Part,
    Role,
    Text,
    ToolCall,
    ToolResult,
    ToolSpec,
    TurnRequest,
)

from ..dialect import (
    OWN_PARAMS,
    Parsed,
    conversation_key,
    header_effort,
    optional,
    session_id,
)

IGNORED_PARAMS = frozenset({
    "max_tokens", "stop_sequences", "temperature", "top_p", "top_k", "metadata",
    "service_tier", "container", "mcp_servers", "context_management",
})
KNOWN_PARAMS = frozenset({"model", "messages", "system", "stream", "thinking", "tools", "tool_choice",
                          "output_config", "output_format"}) \
    | IGNORED_PARAMS | OWN_PARAMS
# Claude Code's first system block changes per build and names no instruction: it is dropped,
# so that it neither reaches droid nor breaks the match of a resent conversation.
BILLING_HEADER = "x-anthropic-billing-header:"
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

# Thinking budget (tokens) → droid reasoning effort: the first bound the budget fits under.
THINKING_EFFORTS = ((2048, "low"), (8192, "medium"), (32768, "high"))
THINKING_ABOVE = "max"


def thinking_effort(thinking: Any) -> str | None:
    """droid's effort for Anthropic's ``thinking``: disabled → none set; enabled → by budget;
    adaptive → dynamic."""
    if thinking is None:
        return None
    if not isinstance(thinking, Mapping) or thinking.get("type") not in ("enabled", "disabled", "adaptive"):
        raise errors.InvalidRequest("'thinking.type' must be enabled, disabled or adaptive.", param="thinking")
    kind = thinking["type"]
    if kind == "disabled":
        return None
    if kind == "adaptive":
        return "dynamic"
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1024:
        raise errors.InvalidRequest("'thinking.budget_tokens' must be an integer of at least 1024.",
                                    param="thinking.budget_tokens")
    return next((effort for bound, effort in THINKING_EFFORTS if budget <= bound), THINKING_ABOVE)


def output_effort(config: Any) -> str | None:
    """``output_config.effort`` (low, medium, high, max), as Claude Code sends it."""
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raise errors.InvalidRequest("output_config: must be an object.", param="output_config")
    effort = config.get("effort")
    if effort is None:
        return None
    if effort not in ("low", "medium", "high", "xhigh", "max"):
        raise errors.InvalidRequest("output_config.effort: must be low, medium, high, xhigh or max.",
                                    param="output_config.effort")
    return str(effort)


def output_format(body: Mapping[str, Any]) -> OutputFormat | None:
    """Structured output: ``output_config.format``, or the beta's top-level ``output_format``,
    ``{"type": "json_schema", "schema": {...}}``."""
    config = body.get("output_config")
    raw, where = (config.get("format"), "output_config.format") if isinstance(config, Mapping) else (None, "")
    if raw is None:
        raw, where = body.get("output_format"), "output_format"
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or raw.get("type") != "json_schema":
        raise errors.InvalidRequest(f"{where}: must be an object with type \"json_schema\" and a schema.", param=where)
    if "schema" not in raw:
        raise errors.InvalidRequest(f"{where}.schema: Field required.", param=f"{where}.schema")
    return structured.output_format(raw["schema"], f"{where}.schema")


def parse(body: Any, headers: Mapping[str, str]) -> Parsed:
    if not isinstance(body, Mapping):
        raise errors.InvalidRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise errors.InvalidRequest("model: Field required (a non-empty string).", param="model")
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise errors.InvalidRequest("max_tokens: Field required (a positive integer).", param="max_tokens")
    system = _system(body.get("system"))
    messages = _messages(body.get("messages"))
    stream = optional(body, "stream", bool, False)
    effort = output_effort(body.get("output_config")) or thinking_effort(body.get("thinking"))
    exact = False
    if effort is None:
        effort, exact = header_effort(headers), True
    tools = _tools(body.get("tools"))
    tool_choice = _tool_choice(body.get("tool_choice"))
    ignored = tuple(sorted(k for k in body if k in IGNORED_PARAMS or k not in KNOWN_PARAMS))
    request = TurnRequest(
        model=model.strip(), messages=messages, system=system, stream=stream, reasoning_effort=effort,
        effort_is_exact=exact, session_id=session_id(body, headers),
        conversation_key=conversation_key(body, headers), tools=tools, tool_choice=tool_choice,
        output_format=output_format(body), dialect="anthropic", ignored=ignored,
    )
    return Parsed(request)


def _tools(raw: Any) -> tuple[ToolSpec, ...]:
    """Client tools (``input_schema``). Anthropic's server tools (web search, code execution …)
    run on Anthropic's side, which droid is not: they are refused, not silently dropped."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise errors.InvalidRequest("tools: must be an array of tool definitions.", param="tools")
    out = []
    for index, tool in enumerate(raw):
        where = f"tools[{index}]"
        if not isinstance(tool, Mapping):
            raise errors.InvalidRequest(f"{where}: must be an object.", param=where)
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise errors.InvalidRequest(f"{where}: tool type {kind!r} runs on Anthropic's servers; droidpool "
                                        "supports client tools (with an input_schema).", param=where)
        name = tool.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise errors.InvalidRequest(f"{where}.name: letters, digits, '_' or '-', at most 128.", param=where)
        schema = tool.get("input_schema")
        if not isinstance(schema, Mapping):
            raise errors.InvalidRequest(f"{where}.input_schema: Field required (a JSON schema object).",
                                        param=where)
        description = tool.get("description")
        out.append(ToolSpec(name, description if isinstance(description, str) else "", dict(schema)))
    return tuple(out)


def _tool_choice(raw: Any) -> Literal["auto", "none"]:
    """auto or none. any and tool (force a call) and disable_parallel_tool_use are refused: droid
    lets the model choose, and may run several calls at once."""
    if raw is None:
        return "auto"
    if not isinstance(raw, Mapping) or raw.get("type") not in ("auto", "none", "any", "tool"):
        raise errors.InvalidRequest("tool_choice: must be an object with type auto, none, any or tool.",
                                    param="tool_choice")
    if raw["type"] in ("any", "tool"):
        raise errors.InvalidRequest(f"tool_choice: {raw['type']!r} cannot be honoured: droid cannot force a "
                                    "tool call; use auto or none.", param="tool_choice")
    if raw.get("disable_parallel_tool_use"):
        raise errors.InvalidRequest("tool_choice.disable_parallel_tool_use cannot be honoured: the model may "
                                    "call several tools at once.", param="tool_choice")
    return "none" if raw["type"] == "none" else "auto"


def _system(raw: Any) -> str:
    if raw is None:
        return ""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        texts = []
        for index, block in enumerate(raw):
            if not isinstance(block, Mapping) or block.get("type") != "text" or not isinstance(block.get("text"), str):
                raise errors.InvalidRequest(f"system[{index}]: system blocks must be text blocks.",
                                            param=f"system[{index}]")
            if not block["text"].startswith(BILLING_HEADER):
                texts.append(block["text"])
        return "\n\n".join(texts)
    raise errors.InvalidRequest("system: must be a string or an array of text blocks.", param="system")


def _messages(raw: Any, user_last: bool = True) -> tuple[Message, ...]:
    if not isinstance(raw, list) or not raw:
        raise errors.InvalidRequest("messages: must be a non-empty array.", param="messages")
    out: list[Message] = []
    for index, message in enumerate(raw):
        param = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise errors.InvalidRequest(f"{param}: must be an object.", param=param)
        role = message.get("role")
        if role not in ("user", "assistant", "system"):  # Claude Code sends system notes mid-conversation
            raise errors.InvalidRequest(f"{param}.role: must be user or assistant.", param=f"{param}.role")
        neutral: Role = role
        out.append(Message(neutral, _content(message.get("content"), f"{param}.content", role)))
    last = out[-1]
    if user_last and last.role == "assistant":
        raise errors.InvalidRequest(
            "The last message must be from the user: droid cannot continue a prefilled assistant turn.",
            param=f"messages[{len(out) - 1}].role",
        )
    return tuple(out)


def _content(content: Any, param: str, role: str) -> tuple[Part, ...]:
    if isinstance(content, str):
        return (Text(content),)
    if not isinstance(content, list):
        raise errors.InvalidRequest(f"{param}: must be a string or an array of content blocks.", param=param)
    parts: list[Part] = []
    for index, block in enumerate(content):
        where = f"{param}[{index}]"
        kind = block.get("type") if isinstance(block, Mapping) else None
        if not isinstance(kind, str):
            raise errors.InvalidRequest(f"{where}: must be a content block with a type.", param=where)
        assert isinstance(block, Mapping)
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise errors.InvalidRequest(f"{where}.text: must be a string.", param=where)
            parts.append(Text(block["text"]))
        elif kind in ("thinking", "redacted_thinking"):
            continue  # droid keeps its own reasoning; a client's copy is accepted and not resent
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise errors.InvalidRequest(f"{where}: tool_use needs an id and a name.", param=where)
            parts.append(ToolCall(block["id"], block["name"], orjson.dumps(block.get("input") or {}).decode()))
        elif kind == "tool_result" and role != "assistant":
            if not isinstance(block.get("tool_use_id"), str):
                raise errors.InvalidRequest(f"{where}.tool_use_id: must be a string.", param=where)
            text, attached = _result_content(block.get("content"), where)
            parts.append(ToolResult(block["tool_use_id"], text, bool(block.get("is_error")), tuple(attached)))
        elif kind in ("image", "document") and role != "assistant":
            parts.append(_attachment(block, where))
        else:
            raise errors.InvalidRequest(f"{where}: content block type {kind!r} is not supported.", param=where)
    return tuple(parts)


def _result_content(content: Any, where: str) -> tuple[str, list[Attachment]]:
    """A tool result's text, and the images and documents it holds (Claude Code's Read tool returns
    a screenshot or a PDF this way)."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise errors.InvalidRequest(f"{where}.content: must be a string or an array of content blocks.", param=where)
    texts: list[str] = []
    attached: list[Attachment] = []
    for index, block in enumerate(content):
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "text" and isinstance(block, Mapping) and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_reference" and isinstance(block, Mapping):
            texts.append(f"[tool reference: {block.get('tool_name', '')}]")
        elif kind in ("image", "document") and isinstance(block, Mapping):
            attached.append(_attachment(block, f"{where}.content[{index}]"))
        else:
            raise errors.InvalidRequest(f"{where}.content[{index}]: tool results may hold text, image and document "
                                        f"blocks; got {kind!r}.", param=f"{where}.content[{index}]")
    return "\n".join(texts), attached


def _attachment(block: Mapping[str, Any], where: str) -> Attachment:
    """An ``image`` or ``document`` block: base64, text, content or URL sources (file ids are refused)."""
    kind: AttachmentKind = "image" if block["type"] == "image" else "document"
    source = block.get("source")
    if not isinstance(source, Mapping):
        raise errors.InvalidRequest(f"{where}.source: Field required (an object).", param=f"{where}.source")
    title = block.get("title")
    name = title if isinstance(title, str) else ""
    media_type = source.get("media_type")
    media_type = media_type if isinstance(media_type, str) else ""
    source_type = source.get("type")
    if source_type == "base64":
        return attachments.from_base64(kind, media_type, source.get("data"), name=name, where=where)
    if source_type == "url":
        return attachments.from_url(kind, source.get("url"), media_type=media_type, name=name, where=where)
    if source_type == "text" and kind == "document":
        return attachments.from_text(source.get("data"), media_type=media_type or "text/plain", name=name,
                                     where=where)
    if source_type == "content" and kind == "document":
        blocks = source.get("content")
        if isinstance(blocks, str):
            return attachments.from_text(blocks, name=name, where=where)
        if isinstance(blocks, list) and all(isinstance(b, Mapping) and b.get("type") == "text" for b in blocks):
            return attachments.from_text("\n".join(str(b.get("text", "")) for b in blocks), name=name, where=where)
        raise errors.InvalidRequest(f"{where}.source.content: a content document holds text blocks.", param=where)
    if source_type == "file":
        return attachments.unsupported(kind, where, "file sources are not supported (droidpool has no Files API); "
                                                    "send base64 data")
    raise errors.InvalidRequest(f"{where}.source.type: must be base64, url" + (", text or content" if kind ==
                                "document" else "") + ".", param=f"{where}.source")


def count_tokens(body: Any) -> dict[str, Any]:
    """``POST /v1/messages/count_tokens``: an estimate from Anthropic's published tokenizer."""
    if not isinstance(body, Mapping):
        raise errors.InvalidRequest("The request body must be a JSON object.")
    if not isinstance(body.get("model"), str) or not body["model"].strip():
        raise errors.InvalidRequest("model: Field required (a non-empty string).", param="model")
    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools):
        raise errors.InvalidRequest("tools: must be an array of tool definitions.", param="tools")
    messages = _messages(body.get("messages"), user_last=False)
    return {"input_tokens": tokens.estimate(_system(body.get("system")), messages, tools)}


def models_page(listing: list[Listed], query: Mapping[str, str]) -> dict[str, Any]:
    """``GET /v1/models`` in Anthropic's shape, paged by ``limit``, ``after_id`` and ``before_id``."""
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 1000:
        raise errors.InvalidRequest("limit: must be an integer from 1 to 1000.", param="limit")
    ids = [m.id for m in listing]
    start, end = 0, len(listing)
    for param in ("after_id", "before_id"):
        anchor = query.get(param)
        if anchor is not None and anchor not in ids:
            raise errors.InvalidRequest(f"{param}: no model {anchor!r}.", param=param)
    if "after_id" in query:
        start = ids.index(query["after_id"]) + 1
    if "before_id" in query:
        end = ids.index(query["before_id"])
        start = max(start, end - limit)
    page = listing[start:end][:limit]
    data = [{"type": "model", "id": m.id, "display_name": str(m.info.get("displayName") or m.id),
             "created_at": "1970-01-01T00:00:00Z"} for m in page]
    return {"data": data, "has_more": start + len(page) < end,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
