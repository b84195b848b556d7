"""One turn's droid events folded into neutral outputs: text and reasoning, retraction replay, failure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from droidpool import errors
from droidpool.droid.protocol import (
    Notice,
    PermissionAsked,
    Retracted,
    Retrying,
    TextDelta,
    ThinkingDelta,
    ToolCallSeen,
    TurnCompleted,
    TurnError,
    TurnEvent,
    Usage,
)

from .failures import failure_for
from .model import Output, ReasoningOut, TextOut, ToolArgsOut, ToolCall, ToolCallOut

MESSAGE_SEPARATOR = "\n\n"  # between the texts of a turn's assistant messages


@dataclass
class _MessageText:
    text: str = ""  # droid's current text for the message; a retraction empties it
    sent: str = ""  # what a streaming client has been given for it
    replay: int | None = None  # after a retraction: how much of ``sent`` the retry has re-sent


@dataclass
class Accumulator:
    """Folds one turn's events into outputs to send now and, at the end, the turn's result.

    Streaming and non-streaming answers in every dialect come from this fold. Retracted text
    that droid re-streams on a retry is matched against what was already sent, so a streaming
    client never receives it twice; the final ``text`` is droid's text after its last
    retraction. A retry that says something else than the retracted text cannot be unsent
    from a stream: the stream then carries both.
    """

    reasoning_parts: list[str] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    completed: TurnCompleted | None = None
    problems: list[str] = field(default_factory=list)
    _messages: dict[str, _MessageText] = field(default_factory=dict)
    _last_message: str | None = None
    # Client tools: droid's LLM name → the client's (None: not a client tool); the calls seen.
    client_name: Callable[[str], str | None] = field(default=lambda name: None, repr=False)
    _calls: dict[str, int] = field(default_factory=dict)  # tool-use id → index of its ToolCallOut
    tool_calls: list[ToolCall] = field(default_factory=list)
    permission: PermissionAsked | None = None  # droid waits for this answer: the turn parks
    saw_tool_search: bool = False  # the LLM had to search for the client's tools (they were deferred)
    # A structured answer: droid validates the final message and may reject it and retry, so no
    # text is sent until droid accepts one; ``text`` is then the accepted message alone.
    structured: bool = False
    sent_images: bool = False  # the turn gave droid images (a failure with no word from droid is theirs)

    def feed(self, event: TurnEvent) -> list[Output]:
        """What to send the client for ``event``."""
        if isinstance(event, TextDelta):
            if self.structured:
                self._messages.setdefault(event.message_id, _MessageText()).text += event.text
                self._last_message = event.message_id
                return []
            text = self._fresh_text(event.message_id, event.text)
            return [TextOut(text)] if text else []
        if isinstance(event, ThinkingDelta):
            if not event.text:
                return []
            self.reasoning_parts.append(event.text)
            return [ReasoningOut(event.text)]
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
        if isinstance(event, ToolCallSeen):
            name = self.client_name(event.name)
            if name is None:
                self.saw_tool_search = self.saw_tool_search or event.name == "ToolSearch"
                return []
            if event.id in self._calls:
                return []
            self._calls[event.id] = len(self._calls)
            return [ToolCallOut(self._calls[event.id], event.id, name)]
        if isinstance(event, PermissionAsked):
            out: list[Output] = []
            self.tool_calls = []
            for use in event.tool_uses:
                name = self.client_name(use.name) or use.name
                if use.id not in self._calls:
                    self._calls[use.id] = len(self._calls)
                    out.append(ToolCallOut(self._calls[use.id], use.id, name))
                arguments = orjson.dumps(use.input).decode()
                self.tool_calls.append(ToolCall(use.id, name, arguments))
                out.append(ToolArgsOut(self._calls[use.id], arguments))
            self.permission = event
            return out
        assert isinstance(event, Retrying)
        return []

    def _fresh_text(self, message_id: str, text: str) -> str:
        state = self._messages.setdefault(message_id, _MessageText())
        state.text += text
        separator = ""
        if self._last_message is not None and self._last_message != message_id and not state.sent:
            separator = MESSAGE_SEPARATOR
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
        if self.structured:
            last = self._messages.get(self._last_message) if self._last_message is not None else None
            return last.text.strip() if last is not None else ""
        return MESSAGE_SEPARATOR.join(m.text for m in self._messages.values() if m.text)

    @property
    def reasoning(self) -> str:
        return "".join(self.reasoning_parts)

    def failure(self) -> errors.DroidpoolError | None:
        """The error to report if the turn failed (None when it completed)."""
        reason = self.completed.reason if self.completed else "incomplete"
        if reason == "error" and self.sent_images and not self.problems and self.usage == Usage():
            # droid fails a turn before any LLM call when it cannot re-encode an image (it says why
            # only after the turn has ended): the image is the client's to change.
            return errors.InvalidRequest(
                "droid could not process an attached image: it scales each image to at most 1024 px and "
                "compresses it below 200 KiB, and this one could not be; send a smaller or simpler image.",
                code="image_not_processed")
        return failure_for(reason, self.problems)
