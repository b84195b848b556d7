"""The store's contract: session and turn records, and the operations every backend provides, by concern."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from droidpool.droid.protocol import Usage

MAX_LIST_LIMIT = 1000


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    model: str
    head_digest: str | None
    created_at: float
    updated_at: float
    turns: int
    usage: Usage
    conversation_key: str | None = None
    parent_id: str | None = None
    in_flight: bool = False  # a turn started and has not been recorded (yet, or ever: a crash)
    diverged: bool = False  # droid's history holds a turn the client never saw completed
    failed_turns: int = 0
    owner: str = ""  # the API key's name that created it; "" without authentication
    last_turn_id: str | None = None  # the session's latest completed turn
    node_id: str | None = None  # the node that holds its live droid worker (several nodes)

    @property
    def matchable(self) -> bool:
        """May a stateless resend continue this session? Only if its droid history is exactly
        the client-visible one, nobody named it, and it is not an untouched fork."""
        return (
            self.head_digest is not None
            and not self.in_flight
            and not self.diverged
            and self.conversation_key is None
            and not (self.parent_id is not None and self.turns == 0)
        )

    def public(self, ttl_s: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.session_id,
            "object": "droidpool.session",
            "model": self.model,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "turns": self.turns,
            "failed_turns": self.failed_turns,
            "conversation_id": self.conversation_key,
            "parent_id": self.parent_id,
            "in_flight": self.in_flight,
            "diverged": self.diverged,
            "usage": self.usage.to_json(),
        }
        if ttl_s is not None:
            body["expires_at"] = self.updated_at + ttl_s
        return body


@dataclass(frozen=True)
class TurnRow:
    """One turn that reached droid, completed or failed: its usage, and its output if kept."""

    turn_id: str
    session_id: str
    model: str
    usage: Usage
    started_at: float
    owner: str = ""
    dialect: str = "openai"
    output: Mapping[str, Any] | None = field(default=None, compare=False)  # kept for retrieval
    status: str = "completed"  # completed | failed | park_ended (a parked turn that got no results)
    # The ledger: which droid model ran it, for which conversation, and what it cost.
    droid_model: str = ""
    conversation_key: str | None = None
    standard_tokens: float = 0.0
    multiplier: float | None = None
    cost_source: str = "unpriced"
    usd: float | None = None
    finished_at: float | None = None  # None: when the store writes it
    # What it sent droid besides text: the images and documents (their tokens are in ``usage``,
    # as the upstream counted them).
    attachments: int = 0
    attachment_bytes: int = 0


Dimension = Literal["key", "model", "session", "day", "dialect", "status", "bucket"]
DIMENSIONS: tuple[Dimension, ...] = ("key", "model", "session", "day", "dialect", "status", "bucket")


@dataclass(frozen=True)
class LedgerQuery:
    """Which turns to sum (finished in [since, until), ``owner``'s or everyone's) and how to group
    them; ``bucket`` groups by ``floor(finished_at / bucket_s)``, ``day`` by UTC date."""

    since: float = 0.0
    until: float = float("inf")
    owner: str | None = None
    by: tuple[Dimension, ...] = ()
    bucket_s: float = 0.0


@dataclass(frozen=True)
class LedgerGroup:
    group: tuple[str, ...]  # one value per ``LedgerQuery.by`` dimension
    turns: int
    failed: int
    usage: Usage
    standard_tokens: float
    usd: float
    attachments: int = 0
    attachment_bytes: int = 0

    def to_json(self, by: tuple[str, ...]) -> dict[str, Any]:
        return {**dict(zip(by, self.group, strict=True)), "turns": self.turns, "failed_turns": self.failed,
                **self.usage.to_json(), "factory_credits": round(self.usage.factory_credits, 4),
                "standard_tokens": round(self.standard_tokens, 3), "usd": round(self.usd, 6),
                "attachments": self.attachments, "attachment_bytes": self.attachment_bytes}


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One ledger row as budgets count it; ``seq`` grows with every row written."""

    seq: int
    finished_at: float
    owner: str
    standard_tokens: float
    factory_credits: float


@dataclass(frozen=True)
class NodeRow:
    """A droidpool node sharing the store: where to reach it, and when it last said it is alive."""

    node_id: str
    url: str
    capacity: int
    started_at: float
    heartbeat_at: float
    state: str = "serving"  # serving | draining
    sessions: int = 0  # sessions whose worker it holds (when listed)


@dataclass(frozen=True)
class Page:
    """One page of the session list, newest update first."""

    records: list[SessionRecord]
    has_more: bool


class UnknownCursor(LookupError):
    """A list's ``after`` names no session."""


class SessionRecords(Protocol):
    """Sessions and the turns recorded on them: lookups, the list, turn bookkeeping, expiry."""

    ttl_s: float  # a session untouched this long expires

    # reads
    async def get(self, session_id: str) -> SessionRecord | None: ...
    async def by_key(self, key: str, owner: str = "") -> SessionRecord | None: ...
    async def find_head(self, digest: str) -> SessionRecord | None: ...
    async def page(
        self, limit: int = 100, after: str | None = None, *, expired: bool = False, owner: str | None = None
    ) -> Page: ...
    async def all_ids(self) -> dict[str, bool]: ...
    async def interrupted(self, node_id: str | None = None) -> list[str]:
        """Sessions (this node's, or no node's) whose last turn reached droid and was never recorded."""
        ...
    async def get_turn(self, turn_id: str, owner: str) -> TurnRow | None: ...

    # writes
    async def create(
        self,
        session_id: str,
        model: str,
        *,
        conversation_key: str | None = None,
        parent_id: str | None = None,
        head_digest: str | None = None,
        in_flight: bool = False,
        diverged: bool = False,
        owner: str = "",
    ) -> bool: ...
    async def bind_key(self, session_id: str, key: str, owner: str = "") -> bool: ...
    async def begin_turn(self, session_id: str) -> None: ...
    async def recovered(self, session_id: str) -> None:
        """An interrupted session's droid files are back at its last recorded turn."""
        ...
    async def complete_turn(self, turn: TurnRow, head_digest: str) -> None: ...
    async def fail_turn(self, turn: TurnRow, *, diverge: bool = True) -> None: ...
    async def forget_output(self, turn_id: str, owner: str) -> bool: ...
    async def delete(self, session_id: str) -> bool:
        """Forget a session, its droid files and its turns' kept outputs (their ledger rows stay)."""
        ...
    async def sweep(self) -> int:
        """Delete every expired session as ``delete`` does, and drop outputs kept as long; how many
        sessions went."""
        ...


class LedgerStore(Protocol):
    """The usage ledger's reads; its rows are the turns ``complete_turn`` and ``fail_turn`` write."""

    async def ledger(self, query: LedgerQuery) -> list[LedgerGroup]: ...
    async def ledger_entries(self, after: int, since: float, limit: int) -> list[LedgerEntry]: ...


class NodeRegistry(Protocol):
    """The nodes sharing the store, and which of them holds each session's live worker."""

    async def heartbeat(self, node: NodeRow) -> None: ...
    async def nodes(self, sessions: bool = False) -> list[NodeRow]: ...
    async def remove_node(self, node_id: str) -> None: ...
    async def claim(self, session_id: str, node_id: str | None) -> None: ...
    async def release_node(self, node_id: str) -> int: ...


class SessionFiles(Protocol):
    """droid's session files, kept in the store so that any node can take a session over."""

    async def save_files(self, session_id: str, appends: list[tuple[str, int, bytes]],
                         replaces: list[tuple[str, bytes]]) -> None: ...
    async def load_files(self, session_id: str) -> dict[str, bytes]: ...


class Locks(Protocol):
    """Locks by name that exclude the other nodes sharing the store."""

    def hold(self, name: str) -> AbstractAsyncContextManager[None]:
        """Exclude every other holder of ``name`` sharing this store (other nodes); the caller
        serializes its own process's holders first. Released if the holder's node dies."""
        ...

    def on_lock_loss(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` if the locks ``hold`` gave are lost (their connection died): whoever
        holds them must stop, since another node may now enter the same session."""
        ...


class ClusterStore(NodeRegistry, SessionFiles, Protocol):
    """What a node among several needs: the registry, and droid's session files."""


class SessionStore(SessionRecords, LedgerStore, NodeRegistry, SessionFiles, Locks, Protocol):
    """All of it, opened and closed: what a backend implements and the daemon passes around. One
    contract-test suite runs against every backend."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...


def assemble(rows: Iterable[tuple[str, int, bytes]]) -> dict[str, bytes]:
    """Each file from its stored chunks (name, start byte, data) in order, up to the first gap."""
    files: dict[str, bytearray] = {}
    for name, start, data in rows:
        buffer = files.setdefault(name, bytearray())
        if start == len(buffer):
            buffer += data
        elif start + len(data) > len(buffer) >= start:  # an overlapping re-upload: its new tail
            buffer += data[len(buffer) - start:]
    return {name: bytes(data) for name, data in files.items()}
