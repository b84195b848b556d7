"""The neutral turn: what a client asks of droid, and what comes back, whatever the wire dialect."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from droidpool.droid.protocol import Usage as Usage  # re-exported: the api takes it from the core

Role = Literal["user", "assistant", "tool", "system"]  # system: a note mid-conversation
Dialect = Literal["openai", "anthropic", "responses"]
StopReason = Literal["end_turn", "tool_calls"]


# --- content: what a message holds --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Text:
    text: str


AttachmentKind = Literal["image", "document"]


@dataclass(frozen=True, slots=True)
class Attachment:
    """An image or a document a message carries: its bytes (or, before fetching, a URL), media
    type and name. Known by ``sha256``: the same bytes resent are the same attachment.

    ``where`` names the part in the client's request (errors name it); ``problem`` says why the
    dialect could not read it. A problem is reported when the turn is admitted rather than at
    parse time, so a parked turn whose results carry it is released (``core/attachments.py``)."""

    kind: AttachmentKind
    media_type: str
    data: bytes = b""  # the bytes (empty while ``encoded`` is not yet decoded: see attachments.decoded)
    name: str = ""
    url: str | None = None
    where: str = field(default="", compare=False)
    problem: str | None = field(default=None, compare=False)
    sha256: str = field(default="", compare=False)
    encoded: bytes = field(default=b"", compare=False, repr=False)  # base64 as sent, whitespace removed

    def __post_init__(self) -> None:
        # Known by the hash of its base64 text: an image resent in a history is recognised without
        # decoding it (every client sends canonical base64, so it is the same text in any dialect).
        if not self.sha256:
            if self.url is not None:
                source = self.url.encode()
            else:
                source = self.encoded or base64.b64encode(self.data)
            object.__setattr__(self, "sha256", hashlib.sha256(source).hexdigest())

    @property
    def size(self) -> int:
        """Its size in bytes (from the base64 length while not decoded)."""
        if self.data or not self.encoded:
            return len(self.data)
        return len(self.encoded) * 3 // 4 - self.encoded[-2:].count(b"=")

    @property
    def is_text(self) -> bool:
        """A document droid takes as text (``files`` entry of type text), not as base64."""
        return self.kind == "document" and is_text_type(self.media_type)

    @property
    def label(self) -> str:
        """How the attachment is named in text droid reads (tool results, transcripts)."""
        return f"[{self.kind}: {self.name or self.media_type}, {self.size} bytes]"


TEXT_DOCUMENT_TYPES = frozenset({"application/json", "application/xml", "application/x-yaml", "application/yaml"})


def is_text_type(media_type: str) -> bool:
    return media_type.startswith("text/") or media_type in TEXT_DOCUMENT_TYPES


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The assistant asked the client to run a tool; ``arguments`` is JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolResult:
    """The client's answer to a tool call."""

    call_id: str
    content: str
    is_error: bool = False
    attachments: tuple[Attachment, ...] = ()  # images (or documents) the tool returned


Part = Text | Attachment | ToolCall | ToolResult


@dataclass(frozen=True, slots=True)
class Message:
    """One message of a conversation; the system prompt is not a message (``TurnRequest.system``)."""

    role: Role
    parts: tuple[Part, ...]

    @classmethod
    def of(cls, role: Role, text: str) -> Message:
        return cls(role, (Text(text),))

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if isinstance(p, Text))

    @property
    def attachments(self) -> Iterator[Attachment]:
        """Every attachment of the message, tool results' included, in order."""
        for part in self.parts:
            if isinstance(part, Attachment):
                yield part
            elif isinstance(part, ToolResult):
                yield from part.attachments


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool the client defines: a name, what it does, and a JSON schema of its arguments."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OutputFormat:
    """Structured output: the final answer is JSON that matches ``schema`` (droid's ``outputFormat``)."""

    schema: Mapping[str, Any]
    name: str = ""
    strict: bool = False
    where: str = field(default="", compare=False)  # the request parameter that asked for it


# --- the request ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TurnRequest:
    """One turn a client asks for, parsed from any dialect.

    The session it continues is named by ``session_id``, else ``previous_turn_id`` (the turn
    whose state it continues), else ``conversation_key``; else the resent history decides.
    """

    model: str
    messages: tuple[Message, ...]
    system: str = ""
    stream: bool = False
    reasoning_effort: str | None = None
    # False when the effort is derived from something else (Anthropic's thinking budget): then
    # a model that lacks it gets its nearest supported effort instead of a 400.
    effort_is_exact: bool = True
    session_id: str | None = None
    conversation_key: str | None = None
    previous_turn_id: str | None = None
    keep_output: bool = False  # store the output so it can be fetched again by its turn id
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: Literal["auto", "none"] = "auto"  # none: no client tool is offered this turn
    output_format: OutputFormat | None = None  # the answer must be JSON matching a schema
    dialect: Dialect = "openai"
    ignored: tuple[str, ...] = ()  # accepted parameters that have no effect, for the client to see
    echo: Mapping[str, Any] = field(default_factory=dict)  # dialect data kept with a kept output


# --- the answer -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextOut:
    """Answer text to send now (already free of retracted text a retry repeated)."""

    text: str


@dataclass(frozen=True, slots=True)
class ReasoningOut:
    """Thinking text to send now."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallOut:
    """The LLM calls client tool ``name`` (the client's name); its arguments follow."""

    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolArgsOut:
    """The whole arguments (JSON text) of the call at ``index``."""

    index: int
    arguments: str


Output = TextOut | ReasoningOut | ToolCallOut | ToolArgsOut


@dataclass(frozen=True)
class TurnResult:
    """A completed turn, as recorded: what every dialect's final response is built from."""

    turn_id: str
    session_id: str
    model: str  # the name the client asked for
    text: str
    reasoning: str
    usage: Usage
    created: int  # Unix time the turn started
    stop: StopReason = "end_turn"
    tool_calls: tuple[ToolCall, ...] = ()  # when ``stop`` is tool_calls: the client's names
    standard_tokens: float | None = None  # what the ledger counts for it (None: not priced yet)

    def to_json(self) -> dict[str, Any]:
        return {
            "turn_id": self.turn_id, "session_id": self.session_id, "model": self.model,
            "text": self.text, "reasoning": self.reasoning, "created": self.created, "stop": self.stop,
            "usage": self.usage.to_json(),
            "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in self.tool_calls],
            "standard_tokens": self.standard_tokens,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TurnResult:
        return cls(
            str(data["turn_id"]), str(data["session_id"]), str(data["model"]), str(data["text"]),
            str(data.get("reasoning", "")), Usage.from_json(data.get("usage") or {}),
            int(data.get("created", 0)), data.get("stop", "end_turn"),
            tuple(ToolCall(str(c["id"]), str(c["name"]), str(c["arguments"])) for c in data.get("tool_calls") or ()),
            data["standard_tokens"] if isinstance(data.get("standard_tokens"), int | float) else None,
        )
