"""Forwarding a turn to the node that holds its session: the request as the client sent it, the
answer (a stream too) passed back byte for byte, authenticated between nodes by their shared secret."""

from __future__ import annotations

import hmac
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web

from droidpool import errors
from droidpool.core.nodes import FORWARDED_BY_HEADER, NODE_SECRET_HEADER, Cluster, Forward

from .dialect import Dialect

log = structlog.get_logger(__name__)

# Hop-by-hop headers (RFC 9110 §7.6.1) and those the HTTP client sets itself.
HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
                 "host", "content-length"})
CONNECT_TIMEOUT_S = 2.0


class ForwardFailed(Exception):
    """The holder could not be connected to: it is treated as gone (nothing reached it)."""


def from_node(request: web.Request, cluster: Cluster | None) -> bool:
    """Did another node forward this request (it carries our shared secret)?"""
    presented = request.headers.get(NODE_SECRET_HEADER)
    return cluster is not None and presented is not None and hmac.compare_digest(
        presented.encode("utf-8", "surrogateescape"), cluster.secret.encode())


async def forward(request: web.Request, cluster: Cluster, target: Forward, dialect: Dialect,
                  http: aiohttp.ClientSession) -> web.StreamResponse:
    body = await request.read()  # already read (and cached) by the turn handler
    lost = errors.WorkerCrashed(f"The node {target.node_id} that ran this turn stopped answering.")
    headers = {k: v for k, v in request.headers.items()
               if k.lower() not in HOP and k.lower() != NODE_SECRET_HEADER.lower()}
    headers[NODE_SECRET_HEADER] = cluster.secret
    headers[FORWARDED_BY_HEADER] = cluster.node_id
    try:
        upstream = await http.post(target.url + request.path_qs, data=body, headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S,
                                                                 sock_connect=CONNECT_TIMEOUT_S))
    except (aiohttp.ClientConnectorError, TimeoutError) as exc:  # nothing reached the holder
        cluster.counters["forward_failures"] += 1
        log.warning("nodes.forward_failed", node=target.node_id, url=target.url, error=str(exc))
        raise ForwardFailed(str(exc)) from None
    except aiohttp.ClientError as exc:
        # The holder had the request and went away before answering: running the turn again
        # here could repeat what droid did, so the client hears of it instead.
        log.warning("nodes.forward_lost", node=target.node_id, error=str(exc))
        raise lost from None
    async with upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in upstream.headers.items():
            if name.lower() not in HOP:
                response.headers.add(name, value)
        response.headers["X-Droidpool-Node"] = target.node_id
        await response.prepare(request)
        while True:
            try:
                chunk = await upstream.content.readany()
            except (aiohttp.ClientError, OSError) as exc:
                log.warning("nodes.forward_cut", node=target.node_id, error=str(exc))
                if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                    await response.write(stream_error(dialect, lost))  # in-band, as for a crashed worker
                    break
                if request.transport is not None:
                    request.transport.close()  # a body cut short must not look complete
                return response
            if not chunk:
                break
            await response.write(chunk)  # the client going away raises here, as for any stream
        await response.write_eof()
        return response


def stream_error(dialect: Dialect, error: errors.DroidpoolError) -> bytes:
    """An error event that ends a stream in the dialect's own way."""
    _, body = dialect.error_body(error)
    # It starts a new event whatever the holder was in the middle of writing.
    if dialect.name == "openai":
        return b"\n\ndata: " + orjson.dumps(body) + b"\n\ndata: [DONE]\n\n"
    if dialect.name == "anthropic":
        return b"\n\nevent: error\ndata: " + orjson.dumps(body) + b"\n\n"
    event: dict[str, Any] = {"type": "error", **body.get("error", {})}
    return b"\n\nevent: error\ndata: " + orjson.dumps(event) + b"\n\n"
