"""What keeps a web page from driving droid: JSON bodies only, Host names we answer to, listed origins.

- CSRF: a browser sends a ``text/plain`` or form body cross-site without asking (a "simple
  request"). Only JSON bodies are read, so such a request never runs a turn (415).
- DNS rebinding: a page whose name resolves to 127.0.0.1 is same-origin with droidpool. On a
  loopback address droidpool answers only to loopback Host names and ``server.allowed_hosts``.
- Origins: a request carrying an ``Origin`` not in ``server.cors_origins`` is refused (403)
  before anything runs; listed origins get CORS answers. Clients that are not browsers send no
  ``Origin`` and are not affected.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ALLOW_METHODS = ("GET", "POST", "DELETE", "OPTIONS")
ALLOW_HEADERS = ("Authorization", "X-Api-Key", "Anthropic-Version", "Anthropic-Beta", "X-Session-Id",
                 "X-Conversation-Id", "X-Request-Id", "X-Reasoning-Effort", "X-Droid-Autonomy", "Content-Type")
EXPOSE_HEADERS = ("X-Session-Id", "X-Conversation-Id", "X-Request-Id", "Request-Id", "X-Droidpool-Ignored-Params",
                  "Retry-After")
PREFLIGHT_MAX_AGE_S = 600


@dataclass(frozen=True)
class BrowserPolicy:
    loopback_bind: bool  # is droidpool listening on a loopback address?
    allowed_hosts: frozenset[str] = frozenset()  # lowercased host names, without port
    cors_origins: frozenset[str] = frozenset()

    @classmethod
    def of(cls, bind_host: str, allowed_hosts: Iterable[str], cors_origins: Iterable[str]) -> BrowserPolicy:
        return cls(is_loopback(bind_host), frozenset(h.lower().rstrip(".") for h in allowed_hosts),
                   frozenset(o.rstrip("/") for o in cors_origins))


def is_loopback(host: str) -> bool:
    host = host.lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The host of a ``Host`` header, without its port: ``[::1]:8765`` → ``[::1]``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    name, _, port = header.rpartition(":")
    return (name if name and port.isdigit() else header).rstrip(".")


def host_allowed(policy: BrowserPolicy, header: str | None) -> bool:
    """May a request naming ``header`` in its Host be answered? On a loopback bind only
    loopback names and the allowed hosts; elsewhere anything, unless allowed hosts are set."""
    if header is None or not header.strip():
        return not policy.loopback_bind and not policy.allowed_hosts
    name = host_name(header)
    if is_loopback(name) or name in policy.allowed_hosts:
        return True
    return not policy.loopback_bind and not policy.allowed_hosts


def origin_allowed(policy: BrowserPolicy, origin: str | None) -> bool:
    """No Origin (curl, SDKs, agent CLIs): allowed. A browser's: only a listed one."""
    return origin is None or origin.rstrip("/") in policy.cors_origins


def is_json(content_type: str) -> bool:
    """``application/json`` or any ``application/*+json``; parameters (charset) do not matter."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def quoted(value: str | None, limit: int = 100) -> str:
    """A header value to quote back in an error message: valid UTF-8, bounded."""
    if value is None:
        return "none"
    clean = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return repr(clean[:limit] + ("..." if len(clean) > limit else ""))


def preflight_headers(origin: str, requested: Mapping[str, str]) -> dict[str, str]:
    """The answer to a listed origin's preflight (``OPTIONS`` with Access-Control-Request-*)."""
    del requested  # the same methods and headers whatever was asked for
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": ", ".join(ALLOW_METHODS),
        "Access-Control-Allow-Headers": ", ".join(ALLOW_HEADERS),
        "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
        "Vary": "Origin",
    }


def response_headers(origin: str) -> dict[str, str]:
    """CORS headers on a listed origin's actual response."""
    return {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": ", ".join(EXPOSE_HEADERS),
            "Vary": "Origin"}
