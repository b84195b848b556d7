"""Client-defined tools offered to droid over MCP: each session's tool set, token and name mapping,
and the results a parked turn is answered with.

droid reaches these tools through droidpool's internal MCP endpoint (``api/mcp.py``), one token
per session. It shows the LLM ``<server>___<tool>`` and, because MCP tools are deferred behind
ToolSearch unless the server's name contains ``github`` (droid 0.225.2, read from the binary and
checked by a self-test), the server is named ``SERVER_NAME``. Names given back to clients are
the clients' own.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .model import ToolResult, ToolSpec

SERVER_NAME = "droidpool-github"  # contains "github": droid offers its tools directly
LLM_PREFIX = f"{SERVER_NAME}___"
MAX_LLM_NAME = 64  # what OpenAI, Anthropic and most upstreams accept for a function name
MAX_TOOL_NAME = MAX_LLM_NAME - len(LLM_PREFIX)
TOKEN_BYTES = 24


def mcp_name(client_name: str) -> str:
    """The tool's MCP name: the client's, if it fits after droid's prefix, else a short form
    with a hash (so it stays unique and the upstream accepts it)."""
    if len(client_name) <= MAX_TOOL_NAME:
        return client_name
    digest = hashlib.sha256(client_name.encode()).hexdigest()[:8]
    return f"{client_name[: MAX_TOOL_NAME - 9]}_{digest}"


def canonical_arguments(arguments: Any) -> str:
    """JSON text of tool arguments with sorted keys: how a result is matched to its call."""
    if isinstance(arguments, str):
        try:
            arguments = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            return str(arguments)
    return orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS).decode()


@dataclass
class SessionTools:
    """One session's tools, its MCP token, and the results waiting to be served."""

    token: str
    tools: tuple[ToolSpec, ...] = ()
    results: dict[tuple[str, str], list[ToolResult]] = field(default_factory=dict)
    listeners: list[MemoryObjectSendStream[bytes]] = field(default_factory=list)

    @property
    def by_mcp_name(self) -> dict[str, ToolSpec]:
        return {mcp_name(t.name): t for t in self.tools}


class ToolBroker:
    """Owns every session's client tools. The MCP endpoint asks it what to list and what to
    answer; the turn service tells it which tools a request brings and which results arrived."""

    def __init__(self) -> None:
        self.url = ""  # http://127.0.0.1:<port>/mcp once the internal listener runs
        self.offered: str = "unknown"  # direct | deferred (behind droid's ToolSearch) | unknown
        self._by_token: dict[str, SessionTools] = {}
        self._by_key: dict[str, SessionTools] = {}  # a session id, or a placeholder until one exists

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def __len__(self) -> int:
        return len(self._by_key)

    # --- the turn service's side ------------------------------------------------------------

    def offer(self, key: str, tools: Sequence[ToolSpec]) -> SessionTools:
        """Set ``key``'s tools (a session id); droid is told when they change."""
        entry = self._by_key.get(key)
        if entry is None:
            entry = SessionTools(secrets.token_urlsafe(TOKEN_BYTES), tuple(tools))
            self._by_key[key] = entry
            self._by_token[entry.token] = entry
            return entry
        if tuple(tools) != entry.tools:
            entry.tools = tuple(tools)
            self._notify(entry, {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
        return entry

    def rename(self, old: str, new: str) -> None:
        """The session a placeholder key stood for now has its id."""
        entry = self._by_key.pop(old, None)
        if entry is not None:
            self._by_key[new] = entry

    def get(self, key: str) -> SessionTools | None:
        return self._by_key.get(key)

    def retain(self, live: Collection[str], keep: Collection[str] = ()) -> int:
        """Forget every session's tools but those of ``live`` sessions and the ``keep`` keys (the
        sweep's: a session that expired, was deleted or never began no longer needs them); how
        many went."""
        gone = [k for k in self._by_key if k not in live and k not in keep and not k.startswith("\0")]
        for key in gone:
            self.forget(key)
        return len(gone)

    def forget(self, key: str) -> None:
        entry = self._by_key.pop(key, None)
        if entry is not None:
            self._by_token.pop(entry.token, None)
            for listener in entry.listeners:
                listener.close()

    def server_param(self, entry: SessionTools) -> dict[str, Any]:
        """The ``mcpServers`` entry that gives a droid session these tools."""
        return {"type": "http", "name": SERVER_NAME, "url": self.url,
                "headers": [{"name": "Authorization", "value": f"Bearer {entry.token}"}]}

    def supply(self, key: str, answers: Iterable[tuple[str, Any, ToolResult]]) -> None:
        """The client's results for a parked turn's calls (MCP tool name, arguments, result),
        to be served when droid asks."""
        entry = self._by_key.get(key)
        if entry is None:
            return
        entry.results.clear()
        for name, arguments, result in answers:
            entry.results.setdefault((name, canonical_arguments(arguments)), []).append(result)

    # --- the MCP endpoint's side --------------------------------------------------------------

    def by_token(self, token: str) -> SessionTools | None:
        return self._by_token.get(token)

    def listing(self, entry: SessionTools) -> list[dict[str, Any]]:
        return [{"name": mcp_name(t.name), "description": t.description,
                 "inputSchema": dict(t.parameters) or {"type": "object", "properties": {}}} for t in entry.tools]

    def call(self, entry: SessionTools, name: str, arguments: Mapping[str, Any] | None) -> tuple[list[dict[str, Any]], bool]:
        """droid calls a tool: the client's result for it, as MCP content (text, then images and
        text documents), and whether it is an error."""
        waiting = entry.results.get((name, canonical_arguments(arguments or {})))
        if not waiting:
            return [{"type": "text", "text": f"droidpool has no result for {name} with these arguments: the client "
                                             "did not send one, or the call changed."}], True
        result = waiting.pop(0)
        return mcp_content(result), result.is_error

    def listen(
        self, entry: SessionTools
    ) -> tuple[MemoryObjectSendStream[bytes], MemoryObjectReceiveStream[bytes]]:
        """A stream of the messages droid should hear about ``entry`` (bounded: 16 pending)."""
        send, receive = anyio.create_memory_object_stream[bytes](16)
        entry.listeners.append(send)
        return send, receive

    def unlisten(self, entry: SessionTools, send: MemoryObjectSendStream[bytes]) -> None:
        send.close()
        if send in entry.listeners:
            entry.listeners.remove(send)

    def _notify(self, entry: SessionTools, message: dict[str, Any]) -> None:
        data = orjson.dumps(message)
        for listener in list(entry.listeners):
            try:
                listener.send_nowait(data)
            except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # a slow or gone listener misses a change; droid re-lists on reconnect


def mcp_content(result: ToolResult) -> list[dict[str, Any]]:
    """A tool result as MCP content blocks: its text, each image, each text document."""
    content: list[dict[str, Any]] = [{"type": "text", "text": result.content}] if result.content or not \
        result.attachments else []
    for attachment in result.attachments:
        if attachment.kind == "image":
            content.append({"type": "image", "data": base64.b64encode(attachment.data).decode("ascii"),
                            "mimeType": attachment.media_type})
        elif attachment.is_text:
            content.append({"type": "text", "text": attachment.data.decode("utf-8", "replace")})
        else:  # a PDF: an embedded resource
            content.append({"type": "resource", "resource": {
                "uri": f"attachment:///{attachment.name or attachment.sha256[:16]}", "mimeType": attachment.media_type,
                "blob": base64.b64encode(attachment.data).decode("ascii")}})
    return content


def offered_directly(exemptions: Sequence[str] | None, server_name: str = SERVER_NAME) -> bool | None:
    """Whether droid shows the LLM our server's tools directly (not behind ToolSearch), from the
    exemption list read from its binary; None if unknown."""
    if exemptions is None:
        return None
    normalized = re.sub(r"[^a-z0-9]", "", server_name.lower())
    return any(normalized.startswith(name) or name in normalized for name in exemptions)


def client_name(entry: SessionTools | None, llm_name: str) -> str | None:
    """The client's name for a tool droid's LLM called, or None if it is not a client tool."""
    if entry is None or not llm_name.startswith(LLM_PREFIX):
        return None
    tool = entry.by_mcp_name.get(llm_name.removeprefix(LLM_PREFIX))
    return tool.name if tool is not None else None
