"""Typed, frozen configuration: defaults < droidpool.toml < DROIDPOOL_* environment < CLI flags."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "DROIDPOOL_"

PERMISSION_OPTIONS = ("cancel", "proceed_once", "proceed_always")
AUTONOMY_LEVELS = ("off", "low", "medium", "high")
# A budget's window: rolling hours or days ("5h", "7d", "30d"), or a calendar month starting on
# a day of the month ("monthly", "monthly:15"), in UTC.
WINDOW_PATTERN = r"(?P<span>\d+(?:\.\d+)?)(?P<unit>[hd])|monthly(?::(?P<day>\d{1,2}))?"
BUDGET_UNITS = ("standard_tokens", "factory_credits")
REASONING_EFFORTS = ("none", "dynamic", "off", "minimal", "low", "medium", "high", "xhigh", "max")

# Every tool id droid 0.225.2 reports from droid.list_tools (tool ids, not LLM names).
# Disabling all of them makes droid send upstream requests with no `tools` key: plain chat.
ALL_TOOL_IDS = (
    "ask-user", "create-cli", "dismiss-handoff-items", "edit-cli", "end-feature-run",
    "execute-cli", "exit-spec-mode", "glob-search-cli", "grep_tool_cli", "loop-cli", "ls-cli",
    "propose-mission", "read-cli", "skill", "stage_settings_changes", "start-mission-run",
    "task-cli", "task-output-cli", "task-stop-cli", "todo_write", "tool-search-cli",
)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and its source."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata={"doc": "Address to listen on."})
    port: int = field(default=8765, metadata={"doc": "TCP port to listen on."})
    allow_non_loopback: bool = field(
        default=False,
        metadata={"doc": "Allow a non-loopback address without API keys (droid can act on this host)."},
    )
    allowed_hosts: tuple[str, ...] = field(
        default=(),
        metadata={"doc": "Host names requests may name in their Host header besides localhost, 127.0.0.1 and "
                         "[::1] (a guard against DNS rebinding); on a non-loopback host, when set, only these "
                         "and the loopback names."},
    )
    cors_origins: tuple[str, ...] = field(
        default=(),
        metadata={"doc": "Browser origins allowed to call droidpool, e.g. [\"http://localhost:3000\"]: they get "
                         "CORS answers; a request with any other Origin header is refused (403)."},
    )
    state_dir: str = field(
        default="~/.local/state/droidpool",
        metadata={"doc": "Where the session store and the workers' working directory live."},
    )
    max_body_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata={"doc": "Largest request body accepted, in bytes: room for attachments.max_total_bytes in "
                         "base64, plus a history that resends earlier images."},
    )
    body_timeout_s: float = field(
        default=30.0, metadata={"doc": "Longest a client may take to send its request body (408 after)."}
    )
    drain_grace_s: float = field(
        default=30.0,
        metadata={"doc": "On SIGTERM, how long running turns may finish before they are interrupted."},
    )
    keepalive_s: float = field(
        default=10.0,
        metadata={"doc": "Seconds of droid silence before an SSE keep-alive comment is sent."},
    )
    log_level: str = field(default="info", metadata={"doc": "debug, info, warning or error."})


@dataclass(frozen=True)
class DroidConfig:
    binary: str = field(
        default="droid", metadata={"doc": "Path to the droid executable (or a name on PATH)."}
    )
    cwd: str = field(
        default="",
        metadata={"doc": "Working directory of the workers; empty = <state_dir>/work."},
    )
    home: str = field(
        default="",
        metadata={"doc": "HOME of the workers (holds ~/.factory); empty = inherit."},
    )
    log_file: str = field(
        default="/dev/null",
        metadata={"doc": "FACTORY_LOG_FILE for the workers; droid's own log grows ~100 KB a run."},
    )
    airgap: bool = field(
        default=False,
        metadata={
            "doc": "Set FACTORY_AIRGAP_ENABLED=1: offline BYOK only, Factory-hosted models refused."
        },
    )
    env: Mapping[str, str] = field(
        default_factory=dict,
        metadata={"doc": "Extra environment variables for the workers (never logged)."},
    )
    autonomy: str = field(
        default="off",
        metadata={"doc": "droid autonomy level: off (read-only), low, medium or high."},
    )
    enabled_tools: tuple[str, ...] = field(
        default=(),
        metadata={"doc": "droid tool ids left enabled; empty = plain chat with no tools."},
    )
    permission_policy: str = field(
        default="cancel",
        metadata={"doc": "Answer to droid's permission requests: cancel, proceed_once or proceed_always."},
    )
    machine_id: str = field(
        default="droidpool", metadata={"doc": "machineId sent to droid.initialize_session."}
    )
    generate_titles: bool = field(
        default=False,
        metadata={"doc": "Let droid ask the LLM for a title on each new session's first turn "
                         "(an extra upstream request); false names sessions itself."},
    )


@dataclass(frozen=True)
class ModelSpec:
    """A model droidpool offers besides droid's own list (shown by ``/v1/models``).

    ``spares`` and ``max_spares`` are obsolete: any idle worker serves any model now, and the
    reserve is ``pool.idle_min`` / ``pool.idle_max``. They are accepted and ignored."""

    id: str
    spares: int = -1
    max_spares: int = -1
@dataclass(frozen=True)
class PoolConfig:
    max_workers: int = field(
        default=0,
        metadata={"doc": "Hard cap on droid processes, starting and stopping included; 0 = from the memory "
                         "available at start-up: half of it, at 300 MB a worker (droid idles at ~180 MB and "
                         "grows to ~300 MB over many conversations), from 2 to 16."},
    )
    idle_min: int = field(
        default=1,
        metadata={"doc": "Workers kept available at all times (any of them starts a new conversation in "
                         "~50 ms; a new process takes ~0.6 s). Replaced when recycled."},
    )
    idle_max: int = field(
        default=4,
        metadata={"doc": "At most this many kept available while requests come in: the reserve follows the "
                         "peak of concurrent requests over the last 5 minutes, from idle_min to idle_max."},
    )
    mint_sessions: bool = field(
        default=True,
        metadata={"doc": "Start a new conversation in any idle worker by loading a session droidpool writes "
                         "(checked by a self-test at start-up; it falls back by itself if droid's format "
                         "changed); false = a fresh process per new conversation."},
    )
    models: tuple[ModelSpec, ...] = field(
        default=(),
        metadata={"doc": "Extra model ids to offer besides droid's list: [{id = \"custom:my-model\"}]."},
    )
    queue_size: int = field(
        default=32, metadata={"doc": "Requests that may wait for a worker before 429s."}
    )
    queue_timeout_s: float = field(
        default=30.0, metadata={"doc": "Longest wait for a worker before a 429."}
    )
    spawn_timeout_s: float = field(
        default=20.0, metadata={"doc": "Deadline for a worker to start and initialize."}
    )
    stop_grace_s: float = field(
        default=3.0, metadata={"doc": "SIGTERM to SIGKILL grace when stopping a worker."}
    )
    memory_budget_mb: int = field(
        default=0,
        metadata={"doc": "RSS budget of all workers (whole process groups, from /proc); 0 = none. "
                         "Over it, idle session workers are evicted (LRU), then surplus spares."},
    )
    max_worker_rss_mb: int = field(
        default=600, metadata={"doc": "An idle worker above this RSS is recycled; 0 = never."}
    )
    max_turns_per_worker: int = field(
        default=200,
        metadata={"doc": "An idle worker that ran this many turns (of any conversations) is recycled; "
                         "0 = never."},
    )
    spare_max_age_s: float = field(
        default=3600.0, metadata={"doc": "A spare older than this is replaced by a fresh one; 0 = never."}
    )
    idle_worker_ttl_s: float = field(
        default=1800.0,
        metadata={"doc": "An available worker above idle_min unused this long is stopped (its session "
                         "stays resumable); 0 = never."},
    )
    max_concurrent_spawns: int = field(
        default=2, metadata={"doc": "Processes starting at once; more only slows every one on few cores."}
    )
    max_event_line_bytes: int = field(
        default=8 * 1024 * 1024,
        metadata={"doc": "Longest line accepted from droid's stdout; a longer one is skipped and logged."},
    )


@dataclass(frozen=True)
class ModelsConfig:
    aliases: Mapping[str, str] = field(
        default_factory=dict,
        metadata={"doc": "Client model names, exact or glob, mapped to droid models before resolution and "
                         "key policy: {\"claude-opus-*\" = \"custom:my-model\"}; exact names first, then globs "
                         "in order."},
    )


@dataclass(frozen=True)
class DeadlineConfig:
    first_token_s: float = field(
        default=120.0, metadata={"doc": "Deadline for the first token of a turn."}
    )
    turn_s: float = field(default=900.0, metadata={"doc": "Deadline for a whole turn."})
    interrupt_grace_s: float = field(
        default=3.0,
        metadata={"doc": "After an interrupt, how long a turn may take to stop before a kill."},
    )


@dataclass(frozen=True)
class ToolsConfig:
    enabled: bool = field(
        default=True,
        metadata={"doc": "Offer client-defined tools (tools in a request) to droid's LLM through droidpool's "
                         "internal MCP endpoint on 127.0.0.1; false = requests with tools get a 400."},
    )
    park_timeout_s: float = field(
        default=300.0,
        metadata={"doc": "How long a turn whose LLM called client tools waits for the results; then it is "
                         "interrupted, and results that come later go to droid as a message."},
    )
    max_parked: int = field(
        default=64, metadata={"doc": "Turns waiting for client tool results at once (each holds a worker)."}
    )
    max_parked_per_key: int = field(
        default=8, metadata={"doc": "Of those, the most one API key (or the unauthenticated client) may hold."}
    )


@dataclass(frozen=True)
class AttachmentsConfig:
    max_image_bytes: int = field(
        default=5 * 1024 * 1024,
        metadata={"doc": "Largest image one turn may send droid, in bytes (Anthropic's API takes 5 MB an image)."},
    )
    max_document_bytes: int = field(
        default=32 * 1024 * 1024,
        metadata={"doc": "Largest document (PDF or text) one turn may send droid, in bytes."},
    )
    max_count: int = field(
        default=10,
        metadata={"doc": "Most images and documents one turn may send droid: droid sends a conversation's last 10 "
                         "images upstream and replaces older ones with a note (and re-encodes each, ~0.3 s)."},
    )
    max_total_bytes: int = field(
        default=32 * 1024 * 1024,
        metadata={"doc": "Most bytes of images and documents one turn may send droid (Anthropic's API takes "
                         "32 MB a request). Raise server.max_body_bytes with it: base64 is 4/3 the size."},
    )
    fetch_urls: bool = field(
        default=False,
        metadata={"doc": "Fetch images and documents given by http(s) URL (never from a loopback, private or "
                         "link-local address); false = such parts get a 400."},
    )
    fetch_timeout_s: float = field(
        default=10.0, metadata={"doc": "Deadline for fetching one attachment by URL."}
    )


@dataclass(frozen=True)
class PricingConfig:
    multipliers: Mapping[str, float] = field(
        default_factory=dict,
        metadata={"doc": "Price multipliers by model id or glob, over droid's live tokenMultiplier: "
                         "{\"claude-opus-5\" = 2.0, \"custom:*\" = 1.0}; exact ids first, then globs in order. "
                         "BYOK models (custom:...) without one are free (0)."},
    )
    cached_factor: float = field(
        default=0.1,
        metadata={"doc": "Weight of a cache-read input token in standard tokens (Factory's terms counted "
                         "cached input at 1/10, as droid's own credit estimate does)."},
    )
    usd_per_million: Mapping[str, float] = field(
        default_factory=dict,
        metadata={"doc": "USD per million weighted tokens by model id or glob, for models you pay for "
                         "yourself (BYOK): {\"custom:*\" = 3.0}; fills the ledger's usd column."},
    )
    allow_unpriced: bool = field(
        default=False,
        metadata={"doc": "Let every key use Factory models without a known multiplier (they count 0 standard "
                         "tokens); false = 403 model_unpriced unless the key has allow_unpriced."},
    )


@dataclass(frozen=True)
class Budget:
    """A limit of standard tokens (or factory credits) over a window, for the service or a key."""

    window: str  # WINDOW_PATTERN
    limit: float
    key: str = ""  # "" = the whole service; "*" = each key on its own; else that key's name
    unit: str = "standard_tokens"


@dataclass(frozen=True)
class BudgetsConfig:
    limits: tuple[Budget, ...] = field(
        default=(),
        metadata={"doc": "Budgets: [{window = \"5h\", limit = 2e6, key = \"team-a\", unit = \"standard_tokens\"}]; "
                         "window is \"<n>h\", \"<n>d\" (rolling) or \"monthly[:<start day>]\" (UTC); key \"\" = the "
                         "whole service, \"*\" = each key; a request over one gets 429 insufficient_quota."},
    )
    warn_at: tuple[float, ...] = field(
        default=(0.8, 0.95),
        metadata={"doc": "Fractions of a budget at which a warning goes to the log and the metrics."},
    )


@dataclass(frozen=True)
class StoreConfig:
    url: str = field(
        default="",
        metadata={"doc": "A shared PostgreSQL store for several nodes: \"postgresql://user@host/db\" (install "
                         "droidpool[postgres]; a URL with a password goes in the systemd credential store-url, "
                         "DROIDPOOL_STORE_URL or ~/.pgpass, not here); empty = the embedded SQLite file."},
    )
    path: str = field(
        default="", metadata={"doc": "SQLite session store; empty = <state_dir>/sessions.db."}
    )
    session_ttl_s: float = field(
        default=86400.0, metadata={"doc": "Sessions idle longer than this expire."}
    )
    prune_files: bool = field(
        default=True,
        metadata={"doc": "Every 10 minutes, delete droid's files of expired sessions and of sessions unknown "
                         "for session_ttl_s, with their working directories (as sessions prune-files --apply)."},
    )


@dataclass(frozen=True)
class NodesConfig:
    url: str = field(
        default="",
        metadata={"doc": "This node's own URL, as the other nodes reach it (\"http://10.0.0.5:8765\"): set it on "
                         "every node sharing a PostgreSQL store.url to run them as one service; empty = one node."},
    )
    id: str = field(default="", metadata={"doc": "This node's name in the registry; empty = <hostname>:<port>."})
    secret: str = field(
        default="",
        metadata={"doc": "The secret the nodes share to forward requests to each other (at least 16 characters); "
                         "better in DROIDPOOL_NODES_SECRET or a systemd credential (node-secret) than here."},
    )
    heartbeat_s: float = field(default=2.0, metadata={"doc": "How often a node writes its heartbeat."})
    dead_after_s: float = field(
        default=10.0,
        metadata={"doc": "A node whose heartbeat is older than this is dead: its sessions move to the node "
                         "that gets their next turn."},
    )


@dataclass(frozen=True)
class ApiKey:
    """One bearer key and what it may do. Give ``sha256`` (hex of the key) rather than ``key``."""

    name: str
    sha256: str = ""
    key: str = ""
    models: tuple[str, ...] = ()  # empty = every model
    autonomy: str = "off"  # the most droid autonomy this key's sessions get
    tools: tuple[str, ...] = ()  # droid tool ids this key's sessions may use
    max_concurrent: int = 0  # requests at once; 0 = no limit of its own
    allow_unpriced: bool = False  # may use Factory models without a known multiplier
    admin: bool = False  # sees every key's usage (GET /v1/usage)


@dataclass(frozen=True)
class AuthConfig:
    keys: tuple[ApiKey, ...] = field(
        default=(),
        metadata={"doc": "API keys: [{name = \"team-a\", sha256 = \"<droidpool hash-key>\", "
                         "models = [], autonomy = \"off\", tools = [], max_concurrent = 0, allow_unpriced = false, "
                         "admin = false}]; "
                         "none (and no keys_file, no DROIDPOOL_API_KEY) = no authentication."},
    )
    keys_file: str = field(
        default="",
        metadata={"doc": "A TOML file with more [[keys]] entries (keep it mode 0600)."},
    )


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    droid: DroidConfig = field(default_factory=DroidConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    deadlines: DeadlineConfig = field(default_factory=DeadlineConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    attachments: AttachmentsConfig = field(default_factory=AttachmentsConfig)
    pricing: PricingConfig = field(default_factory=PricingConfig)
    budgets: BudgetsConfig = field(default_factory=BudgetsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    nodes: NodesConfig = field(default_factory=NodesConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)

    @property
    def state_dir(self) -> Path:
        return Path(self.server.state_dir).expanduser()

    @property
    def worker_cwd(self) -> Path:
        return Path(self.droid.cwd).expanduser() if self.droid.cwd else self.state_dir / "work"

    @property
    def store_path(self) -> Path:
        return Path(self.store.path).expanduser() if self.store.path else self.state_dir / "sessions.db"


SECTIONS: dict[str, type[Any]] = {
    f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)
}


def load(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the config from its four layers; ``overrides`` keys are ``section.key``."""
    layers: list[tuple[str, dict[str, dict[str, Any]]]] = []
    if path is not None:
        layers.append((str(path), _read_toml(path)))
    environ = os.environ if environ is None else environ
    layers.append(("environment", _from_environ(environ)))
    if overrides:
        layers.append(("command line", _nest(overrides, "command line")))
    merged: dict[str, dict[str, tuple[Any, str]]] = {}
    for source, layer in layers:
        for section, values in layer.items():
            if section not in SECTIONS:
                raise ConfigError(f"{source}: unknown section [{section}]")
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: [{section}] must be a table")
            for key, value in values.items():
                merged.setdefault(section, {})[key] = (value, source)
    built = {name: _build_section(name, cls, merged.get(name, {})) for name, cls in SECTIONS.items()}
    config = Config(**built)
    _check(config, {s: {k: src for k, (_, src) in v.items()} for s, v in merged.items()}, environ)
    return config


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _from_environ(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """``DROIDPOOL_POOL_MAX_WORKERS=8`` → ``{"pool": {"max_workers": 8}}``; values read as TOML."""
    out: dict[str, dict[str, Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("_")
        if section not in SECTIONS or not key:
            continue
        out.setdefault(section, {})[key] = _parse_scalar(raw)
    return out


def _parse_scalar(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _nest(flat: Mapping[str, Any], source: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for dotted, value in flat.items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(f"{source}: override {dotted!r} must be section.key")
        out.setdefault(section, {})[key] = value
    return out


def _build_section(name: str, cls: type[Any], values: dict[str, tuple[Any, str]]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, (value, source) in values.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key {name}.{key}")
        kwargs[key] = _coerce(value, hints[key], f"{name}.{key}", source)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {key} must be {expected}, got {value!r}")

    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise fail("true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail("an integer")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise fail("a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise fail("a string")
    if origin is tuple:
        (item_hint, _) = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise fail("a list")
        return tuple(_coerce(v, item_hint, f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin in (Mapping, dict) or hint is Mapping:
        args = typing.get_args(hint)
        value_hint = args[1] if len(args) == 2 else str
        if value_hint is str:
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                raise fail("a table of strings")
            return types.MappingProxyType(dict(value))
        if not isinstance(value, dict):
            raise fail("a table")
        return types.MappingProxyType({k: _coerce(v, value_hint, f"{key}.{k}", source) for k, v in value.items()})
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, dict):
            raise fail("a table")
        fields = typing.get_type_hints(hint)
        unknown = set(value) - set(fields)
        if unknown:
            raise ConfigError(f"{source}: unknown key {key}.{sorted(unknown)[0]}")
        for f in dataclasses.fields(hint):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and f.name not in value:
                raise ConfigError(f"{source}: {key} needs an entry {f.name!r}")
        return hint(**{k: _coerce(v, fields[k], f"{key}.{k}", source) for k, v in value.items()})
    raise fail(str(hint))  # pragma: no cover - every field type is handled above


def _check(config: Config, sources: dict[str, dict[str, str]], environ: Mapping[str, str]) -> None:
    def source(section: str, key: str) -> str:
        return sources.get(section, {}).get(key, "defaults")

    def require(ok: bool, section: str, key: str, expected: str) -> None:
        if not ok:
            value = getattr(getattr(config, section), key)
            raise ConfigError(f"{source(section, key)}: {section}.{key} must be {expected}, got {value!r}")

    s, d, p, t = config.server, config.droid, config.pool, config.deadlines
    require(0 <= s.port <= 65535, "server", "port", "between 0 and 65535")
    require(s.max_body_bytes >= 1024, "server", "max_body_bytes", "at least 1024")
    require(s.keepalive_s > 0, "server", "keepalive_s", "positive")
    require(s.drain_grace_s >= 0, "server", "drain_grace_s", "0 or more")
    require(s.body_timeout_s > 0, "server", "body_timeout_s", "positive")
    require(s.log_level in ("debug", "info", "warning", "error"), "server", "log_level",
            "one of debug, info, warning, error")
    require(all(_is_origin(o) for o in s.cors_origins), "server", "cors_origins",
            "origins like \"http://localhost:3000\" (scheme://host[:port], no path, no \"*\")")
    require(all(h and "/" not in h and (h.startswith("[") or ":" not in h) for h in s.allowed_hosts),
            "server", "allowed_hosts", "host names without scheme, port or path")
    require(d.autonomy in AUTONOMY_LEVELS, "droid", "autonomy", f"one of {', '.join(AUTONOMY_LEVELS)}")
    require(d.permission_policy in PERMISSION_OPTIONS, "droid", "permission_policy",
            f"one of {', '.join(PERMISSION_OPTIONS)}")
    require(bool(d.binary), "droid", "binary", "a path or command name")
    require(p.max_workers >= 0, "pool", "max_workers", "0 (automatic) or more")
    require(p.idle_min >= 0, "pool", "idle_min", "0 or more")
    require(p.idle_max >= p.idle_min, "pool", "idle_max", "at least pool.idle_min")
    require(not p.max_workers or p.idle_min <= p.max_workers, "pool", "idle_min", "at most pool.max_workers")
    require(p.queue_size >= 0, "pool", "queue_size", "0 or more")
    require(p.queue_timeout_s > 0, "pool", "queue_timeout_s", "positive")
    require(p.spawn_timeout_s > 0, "pool", "spawn_timeout_s", "positive")
    require(p.stop_grace_s >= 0, "pool", "stop_grace_s", "0 or more")
    require(p.memory_budget_mb >= 0, "pool", "memory_budget_mb", "0 or more")
    require(p.max_worker_rss_mb >= 0, "pool", "max_worker_rss_mb", "0 or more")
    require(p.max_turns_per_worker >= 0, "pool", "max_turns_per_worker", "0 or more")
    require(p.spare_max_age_s >= 0, "pool", "spare_max_age_s", "0 or more")
    require(p.idle_worker_ttl_s >= 0, "pool", "idle_worker_ttl_s", "0 or more")
    require(p.max_concurrent_spawns >= 1, "pool", "max_concurrent_spawns", "at least 1")
    require(p.max_event_line_bytes >= 64 * 1024, "pool", "max_event_line_bytes", "at least 65536")
    require(all(m.id for m in p.models), "pool", "models", "entries with a non-empty id")
    require(t.first_token_s > 0, "deadlines", "first_token_s", "positive")
    require(t.turn_s > 0, "deadlines", "turn_s", "positive")
    require(t.interrupt_grace_s > 0, "deadlines", "interrupt_grace_s", "positive")
    require(config.tools.park_timeout_s > 0, "tools", "park_timeout_s", "positive")
    require(config.tools.max_parked >= 0, "tools", "max_parked", "0 or more")
    require(config.tools.max_parked_per_key >= 0, "tools", "max_parked_per_key", "0 or more")
    at = config.attachments
    for key in ("max_image_bytes", "max_document_bytes", "max_count", "max_total_bytes"):
        require(getattr(at, key) >= 0, "attachments", key, "0 or more")
    require(at.fetch_timeout_s > 0, "attachments", "fetch_timeout_s", "positive")
    require(config.store.session_ttl_s > 0, "store", "session_ttl_s", "positive")
    shared = store_url(config, environ)
    if shared and not shared.startswith(("postgresql://", "postgres://")):
        # not echoed: a URL may hold a password
        raise ConfigError(f"{source('store', 'url')}: store.url must be empty or a postgresql:// URL")
    n = config.nodes
    if n.url:
        if not shared:
            raise ConfigError(f"{source('nodes', 'url')}: nodes.url needs a shared store: set store.url to PostgreSQL")
        if not n.url.startswith(("http://", "https://")):
            raise ConfigError(f"{source('nodes', 'url')}: nodes.url must be an http:// or https:// URL")
        secret = n.secret or _credential(environ, "node-secret")
        if len(secret) < 16:
            raise ConfigError(f"{source('nodes', 'secret')}: nodes.secret must be set (at least 16 characters) "
                              "when nodes.url is")
    require(n.heartbeat_s > 0, "nodes", "heartbeat_s", "positive")
    require(n.dead_after_s > n.heartbeat_s, "nodes", "dead_after_s", "longer than nodes.heartbeat_s")
    pr = config.pricing
    require(all(m >= 0 for m in pr.multipliers.values()), "pricing", "multipliers", "0 or more each")
    require(0 <= pr.cached_factor <= 1, "pricing", "cached_factor", "between 0 and 1")
    require(all(m >= 0 for m in pr.usd_per_million.values()), "pricing", "usd_per_million", "0 or more each")
    require(all(0 < w <= 1 for w in config.budgets.warn_at), "budgets", "warn_at", "fractions above 0, at most 1")
    for index, budget in enumerate(config.budgets.limits):
        where = f"{source('budgets', 'limits')}: budgets.limits[{index}]"
        match = re.fullmatch(WINDOW_PATTERN, budget.window)
        if match is None or (match["span"] is not None and float(match["span"]) <= 0):
            raise ConfigError(f"{where}.window must be \"<n>h\", \"<n>d\" or \"monthly[:<day>]\", got {budget.window!r}")
        if match["day"] is not None and not 1 <= int(match["day"]) <= 31:
            raise ConfigError(f"{where}.window's start day must be 1 to 31, got {budget.window!r}")
        if budget.limit < 0:
            raise ConfigError(f"{where}.limit must be 0 or more")
        if budget.unit not in BUDGET_UNITS:
            raise ConfigError(f"{where}.unit must be one of {', '.join(BUDGET_UNITS)}")
    a = config.auth
    for index, entry in enumerate(a.keys):
        where = f"auth.keys[{index}]"
        if bool(entry.sha256) == bool(entry.key):
            raise ConfigError(f"{source('auth', 'keys')}: {where} needs exactly one of sha256 or key")
        if entry.sha256 and not _is_sha256(entry.sha256):
            raise ConfigError(f"{source('auth', 'keys')}: {where}.sha256 must be 64 hex digits")
        if entry.autonomy not in AUTONOMY_LEVELS:
            raise ConfigError(f"{source('auth', 'keys')}: {where}.autonomy must be one of {', '.join(AUTONOMY_LEVELS)}")
        unknown = set(entry.tools) - set(ALL_TOOL_IDS)
        if unknown:
            raise ConfigError(f"{source('auth', 'keys')}: {where}.tools has unknown tool ids {sorted(unknown)}")
        if entry.max_concurrent < 0:
            raise ConfigError(f"{source('auth', 'keys')}: {where}.max_concurrent must be 0 or more")
    names = [k.name for k in a.keys]
    if len(names) != len(set(names)):
        raise ConfigError(f"{source('auth', 'keys')}: auth.keys names must be unique")
    unknown_tools = set(d.enabled_tools) - set(ALL_TOOL_IDS)
    if unknown_tools:
        raise ConfigError(f"{source('droid', 'enabled_tools')}: droid.enabled_tools has unknown tool ids {sorted(unknown_tools)}")
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    keys_configured = bool(
        a.keys or a.keys_file or environ.get("DROIDPOOL_API_KEY")
        or (credentials and (Path(credentials) / "api-keys").is_file())
    )
    if not s.allow_non_loopback and not _is_loopback(s.host) and not keys_configured:
        raise ConfigError(
            f"{source('server', 'host')}: server.host {s.host!r} is not a loopback address and no "
            "API keys are configured; droid can read files and run commands on this host. "
            "Configure [auth] keys, or set server.allow_non_loopback = true to serve without them"
        )


def _credential(environ: Mapping[str, str], name: str) -> str:
    """A systemd credential (LoadCredential=<name>:...), or ""."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    path = Path(directory) / name if directory else None
    return path.read_text().strip() if path is not None and path.is_file() else ""


def node_secret(config: Config, environ: Mapping[str, str]) -> str:
    return config.nodes.secret or _credential(environ, "node-secret")


def store_url(config: Config, environ: Mapping[str, str]) -> str:
    """``store.url``, else the systemd credential ``store-url`` (a URL with a password stays out of
    the config and the environment)."""
    return config.store.url or _credential(environ, "store-url")


def _is_origin(value: str) -> bool:
    scheme, sep, rest = value.partition("://")
    return bool(sep) and scheme in ("http", "https") and bool(rest) and "/" not in rest.rstrip("/") \
        and "*" not in rest


def _is_sha256(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def field_docs(cls: type[Any]) -> dict[str, str]:
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}
