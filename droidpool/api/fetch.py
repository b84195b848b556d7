"""Attachments given by http(s) URL, fetched when ``[attachments] fetch_urls`` allows it, and only
from public addresses: never loopback, private, link-local or otherwise reserved ones.

Every address a name resolves to must be public, the connection goes to one of those addresses
(a custom resolver, so a second lookup cannot rebind the name), redirects are followed by hand so
each hop is checked the same way, and the body is read up to the attachment limit.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import urllib.parse
from typing import Any

import aiohttp
import anyio
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult

from droidpool.core import attachments, conversation
from droidpool.core.model import Attachment, TurnRequest

log = structlog.get_logger(__name__)

MAX_REDIRECTS = 3


class NotPublic(OSError):
    """The URL names an address droidpool must not fetch from."""


def public(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class PublicResolver(AbstractResolver):
    """The system's resolver, keeping only public addresses (a name with none fails)."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = [r for r in await self._inner.resolve(host, port, family) if public(r["host"])]
        if not found:
            raise NotPublic(f"{host} resolves to no public address")
        return found

    async def close(self) -> None:
        await self._inner.close()


async def fetch_new(request: TurnRequest, limits: attachments.Limits) -> TurnRequest:
    """``request`` with the URL attachments of its new messages fetched (the history's are known
    by their URL and never fetched again). A fetch that fails leaves the part with its problem."""
    split = conversation.split(request.messages)
    if not any(a.url is not None for a in conversation.attachments(split.new)):
        return request
    fetched: dict[str, Attachment] = {}
    connector = aiohttp.TCPConnector(resolver=PublicResolver(), limit=4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=limits.fetch_timeout_s)) \
            as session:
        for attachment in conversation.attachments(split.new):
            if attachment.url is not None and attachment.url not in fetched:
                fetched[attachment.url] = await _fetch(session, attachment, limits)

    def change(a: Attachment) -> Attachment:
        return fetched.get(a.url, a) if a.url is not None else a

    return dataclasses.replace(request, messages=(*split.history, *attachments.replaced(split.new, change)))


async def _fetch(session: aiohttp.ClientSession, attachment: Attachment, limits: attachments.Limits) -> Attachment:
    cap = limits.max_image_bytes if attachment.kind == "image" else limits.max_document_bytes
    url = attachment.url
    assert url is not None
    try:
        with anyio.fail_after(limits.fetch_timeout_s):
            for _ in range(MAX_REDIRECTS + 1):
                _check_literal(url)
                async with session.get(url, allow_redirects=False) as response:
                    if response.status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                        url = urllib.parse.urljoin(url, response.headers["Location"])
                        continue
                    if response.status != 200:
                        return _failed(attachment, f"fetching its URL gave HTTP {response.status}")
                    body = await _read(response, cap)
                    media_type = response.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
                    log.info("attachment.fetched", url=_safe(attachment.url), bytes=len(body))
                    return dataclasses.replace(attachment, data=body, url=None,
                                               media_type=attachment.media_type or media_type)
            return _failed(attachment, f"its URL redirects more than {MAX_REDIRECTS} times")
    except NotPublic as exc:
        return _failed(attachment, f"its URL is not fetched: {exc}")
    except TooLarge:
        return _failed(attachment, f"its URL gives more than {cap} bytes")
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        return _failed(attachment, f"fetching its URL failed ({type(exc).__name__})")


class TooLarge(Exception):
    pass


async def _read(response: aiohttp.ClientResponse, cap: int) -> bytes:
    body = bytearray()
    async for chunk in response.content.iter_chunked(65536):
        body.extend(chunk)
        if len(body) > cap:
            raise TooLarge
    return bytes(body)


def _check_literal(url: str) -> None:
    """An address written in the URL skips the resolver: check it here."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
        raise NotPublic("only http and https URLs are fetched")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return  # a name: the resolver checks what it resolves to
    if not public(host):
        raise NotPublic(f"{host} is not a public address")


def _failed(attachment: Attachment, problem: str) -> Attachment:
    return dataclasses.replace(attachment, url=None, problem=problem)


def _safe(url: Any) -> str:
    """A URL for the log, without its query (it may hold a token)."""
    parts = urllib.parse.urlsplit(str(url))
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
