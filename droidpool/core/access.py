"""Who is asking and what they may do: API keys in constant time, per-key policy, session access."""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from droidpool import errors
from droidpool.config import ALL_TOOL_IDS, AUTONOMY_LEVELS, ApiKey, Config, ConfigError, _coerce

ENV_KEY = "DROIDPOOL_API_KEY"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling and what they may do; ``name`` scopes their sessions."""

    name: str
    models: tuple[str, ...] = ()
    autonomy: str = "off"
    tools: tuple[str, ...] = ()
    max_concurrent: int = 0
    allow_unpriced: bool = False  # may use Factory models without a known multiplier
    admin: bool = False  # sees every key's usage

    def allows_model(self, model: str) -> bool:
        return not self.models or model in self.models


ANONYMOUS = Principal("")


def load_keys(config: Config, environ: Mapping[str, str]) -> list[tuple[str, Principal]]:
    """(sha256, principal) for every key from the config, the keys file and the environment."""
    entries: list[ApiKey] = list(config.auth.keys)
    files = [Path(config.auth.keys_file).expanduser()] if config.auth.keys_file else []
    directory = environ.get("CREDENTIALS_DIRECTORY")  # systemd LoadCredential=api-keys:...
    if directory and (Path(directory) / "api-keys").is_file():
        files.append(Path(directory) / "api-keys")
    for path in files:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read API keys: {exc}") from None
        raw = data.get("keys", [])
        if not isinstance(raw, list):
            raise ConfigError(f"{path}: keys must be an array of tables")
        entries.extend(_coerce(entry, ApiKey, f"keys[{i}]", str(path)) for i, entry in enumerate(raw))
    if environ.get(ENV_KEY):
        entries.append(ApiKey(name="env", key=environ[ENV_KEY], models=(), autonomy="off"))
    out = []
    for entry in entries:
        digest = (entry.sha256 or hash_key(entry.key)).lower()
        out.append((digest, Principal(entry.name, entry.models, entry.autonomy, entry.tools, entry.max_concurrent,
                                           entry.allow_unpriced, entry.admin)))
    return out


class Authenticator:
    """Checks ``Authorization: Bearer <key>``; with no keys configured everyone is ANONYMOUS."""

    def __init__(self, keys: Sequence[tuple[str, Principal]]) -> None:
        self._keys: list[tuple[bytes, Principal]] = []
        self._in_flight: dict[str, int] = {}
        self.set_keys(keys)

    def set_keys(self, keys: Sequence[tuple[str, Principal]]) -> None:
        """Replace the keys (SIGHUP); requests already admitted keep running."""
        self._keys = [(bytes.fromhex(digest), principal) for digest, principal in keys]

    def __repr__(self) -> str:
        return f"<Authenticator {len(self._keys)} keys>"

    @property
    def key_count(self) -> int:
        return len(self._keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, authorization: str | None, x_api_key: str | None = None) -> Principal:
        if not self._keys:
            return ANONYMOUS
        presented = x_api_key
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() == "bearer":
                presented = token.strip()
        if not presented:
            raise errors.Unauthorized(
                "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        # The bytes as received: a key that is not UTF-8 is just a wrong key.
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found: Principal | None = None
        for expected, principal in self._keys:
            # Compare against every key, whatever matched: no timing hint about which did.
            if hmac.compare_digest(digest, expected) and found is None:
                found = principal
        if found is None:
            raise errors.Unauthorized("Invalid API key.")
        return found

    @contextmanager
    def admit(self, principal: Principal) -> Iterator[None]:
        """Hold one of the key's concurrent-request slots, or 429."""
        limit = principal.max_concurrent
        current = self._in_flight.get(principal.name, 0)
        if limit and current >= limit:
            raise errors.Overloaded(
                f"API key {principal.name!r} already has {limit} requests running.",
                code="key_concurrency_limit",
                retry_after=1,
            )
        self._in_flight[principal.name] = current + 1
        try:
            yield
        finally:
            self._in_flight[principal.name] -= 1
            if not self._in_flight[principal.name]:
                del self._in_flight[principal.name]


def effective_autonomy(principal: Principal, requested: str | None, default: str) -> str:
    """The autonomy a session gets: the request's wish (or the default), capped by the key."""
    ceiling = principal.autonomy if principal is not ANONYMOUS else default
    wish = requested or (default if principal is ANONYMOUS else "off")
    if wish not in AUTONOMY_LEVELS:
        raise errors.InvalidRequest(
            f"Autonomy must be one of {', '.join(AUTONOMY_LEVELS)}.", param="X-Droid-Autonomy"
        )
    if AUTONOMY_LEVELS.index(wish) > AUTONOMY_LEVELS.index(ceiling):
        raise errors.Forbidden(
            f"This API key may use droid autonomy up to {ceiling!r}, not {wish!r}.", code="autonomy_not_allowed"
        )
    return wish


@dataclass(frozen=True)
class Access:
    """What a request may reach (only its owner's sessions) and the droid settings its new
    sessions get; the defaults are the unauthenticated operator's."""

    owner: str = ""
    autonomy: str | None = None  # None: droid.autonomy from the config
    disabled_tool_ids: tuple[str, ...] | None = None  # None: from droid.enabled_tools
    allow_unpriced: bool = False  # besides pricing.allow_unpriced


PUBLIC = Access()


def access_for(principal: Principal, requested_autonomy: str | None, default_autonomy: str) -> Access:
    """The session scope and settings a request's key gives it."""
    autonomy = effective_autonomy(principal, requested_autonomy, default_autonomy)
    if principal is ANONYMOUS:
        return Access(owner="", autonomy=autonomy)
    disabled = tuple(t for t in ALL_TOOL_IDS if t not in principal.tools)
    return Access(owner=principal.name, autonomy=autonomy, disabled_tool_ids=disabled,
                  allow_unpriced=principal.allow_unpriced)
