"""The one turn handler every dialect's route uses: admit, run, stream or answer, log and measure."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import structlog
from aiohttp import web

from droidpool import errors
from droidpool.core.access import Access, access_for
from droidpool.core.nodes import Forward
from droidpool.core.turn import Turn

from .context import (
    AUTH,
    DEFAULT_AUTONOMY,
    HTTP_CLIENT,
    KEEPALIVE_S,
    METRICS,
    PRINCIPAL,
    REQUEST_ID,
    TURNS,
    json_response,
    read_json,
)
from .dialect import Dialect, Encoder, Parsed
from .fetch import fetch_new
from .forward import ForwardFailed, forward, from_node
from .sse import SSE_HEADERS, SSEWriter

log = structlog.get_logger(__name__)


async def serve_turn(request: web.Request, dialect: Dialect) -> web.StreamResponse:
    started = time.monotonic()
    parsed = dialect.parse(await read_json(request), request.headers)
    principal = request[PRINCIPAL]
    service = request.app[TURNS]
    if service.attachment_limits.fetch_urls:
        parsed = dataclasses.replace(parsed, turn=await fetch_new(parsed.turn, service.attachment_limits))
    turn_request = parsed.turn
    if not principal.allows_model(service.catalog.alias(turn_request.model)):
        raise errors.Forbidden(f"This API key may not use the model {turn_request.model!r}.",
                               param="model", code="model_not_allowed")
    access = access_for(principal, request.headers.get("X-Droid-Autonomy") or None, request.app[DEFAULT_AUTONOMY])
    local = from_node(request, service.cluster)  # forwarded by another node: served here, whatever
    while True:
        try:
            return await _serve(request, dialect, parsed, access, local, started)
        except Forward as target:
            assert service.cluster is not None
            try:
                return await forward(request, service.cluster, target, dialect, request.app[HTTP_CLIENT])
            except ForwardFailed:
                local = True  # the holder is gone: take the session over here


async def _serve(request: web.Request, dialect: Dialect, parsed: Parsed, access: Access, local: bool,
                 started: float) -> web.StreamResponse:
    turn_request = parsed.turn
    principal = request[PRINCIPAL]
    service = request.app[TURNS]
    status, http_status = "ok", 200
    turn: Turn | None = None
    phase = "admission"  # admission (queued for a worker included) | turn: where a failure happened
    try:
        with request.app[AUTH].admit(principal):
            async with service.turn(turn_request, access, local=local) as turn:
                phase = "turn"
                encoder = dialect.encoder(turn, parsed)
                if turn_request.stream:
                    response, failure = await _stream(request, turn, encoder, parsed)
                    if turn.client_gone:
                        status, http_status = "client_disconnected", 499
                    elif failure is not None:
                        status, http_status = failure.kind, failure.status
                    return response
                try:
                    async for _ in turn.outputs(request.app[KEEPALIVE_S]):
                        pass
                except errors.DroidpoolError as exc:
                    exc.context_headers.update(_turn_headers(turn, parsed))
                    raise
                assert turn.result is not None
                return json_response(encoder.body(turn.result), headers=_turn_headers(turn, parsed))
    except errors.DroidpoolError as exc:
        status, http_status = exc.kind, exc.status
        raise
    except (ConnectionResetError, asyncio.CancelledError):
        # The client hung up (aiohttp cancels the handler; or a write found the socket closed), or
        # shutdown's grace ran out: a normal event, logged on the turn's info line.
        gone = request.transport is None or request.transport.is_closing()
        status, http_status = ("client_disconnected", 499) if gone else ("cancelled", 503)
        raise
    except Forward:
        status, http_status = "forwarded", 0
        raise
    finally:
        usage = turn.usage if turn is not None else None
        ttft = (turn.first_token_at - started) if turn is not None and turn.first_token_at else None
        duration = time.monotonic() - started
        metrics = request.app[METRICS]
        if metrics is not None and status != "forwarded":
            metrics.observe(status=http_status, stream=turn_request.stream, duration_s=duration, ttft_s=ttft,
                            usage=usage, dialect=dialect.name)
        log.info(
            "turn",
            dialect=dialect.name,
            model=turn_request.model,
            key=principal.name or None,
            session=turn.session_id if turn else None,
            turn=turn.turn_id if turn else None,
            conversation=turn_request.conversation_key,
            stream=turn_request.stream,
            status=status,
            http_status=http_status,
            phase=phase if status != "ok" else None,
            ttft_s=round(ttft, 4) if ttft is not None else None,
            duration_s=round(duration, 4),
            worker=turn.worker.id if turn else None,
            input_tokens=usage.prompt_tokens if usage else 0,
            output_tokens=usage.output_tokens if usage else 0,
        )


def _turn_headers(turn: Turn, parsed: Parsed) -> dict[str, str]:
    headers = {"X-Session-Id": turn.session_id}
    if parsed.turn.conversation_key is not None:
        headers["X-Conversation-Id"] = parsed.turn.conversation_key
    if parsed.turn.ignored:
        headers["X-Droidpool-Ignored-Params"] = ",".join(parsed.turn.ignored)
    row = turn.ledger_row
    if row is not None:  # a finished turn (a stream's headers leave first: its final usage says it)
        headers["X-Droidpool-Standard-Tokens"] = f"{row.standard_tokens:.3f}".rstrip("0").rstrip(".")
        headers["X-Droidpool-Cost-Source"] = row.cost_source
    return headers


async def _stream(
    request: web.Request, turn: Turn, encoder: Encoder, parsed: Parsed
) -> tuple[web.StreamResponse, errors.DroidpoolError | None]:
    """Stream the turn; a failure after the 200 goes in-band, and is returned for the log. A client
    that hangs up ends the stream quietly (``turn.client_gone``): its turn is interrupted, or, if
    it parked on tool calls the client never got, released."""
    response = web.StreamResponse(headers={**SSE_HEADERS, **_turn_headers(turn, parsed)})
    response.headers["X-Request-Id"] = response.headers["request-id"] = request[REQUEST_ID]
    failure: errors.DroidpoolError | None = None
    try:
        await response.prepare(request)
        sse = SSEWriter(response)
        await sse.send(encoder.start())
        try:
            async for output in turn.outputs(request.app[KEEPALIVE_S]):
                await sse.send(encoder.keepalive() if output is None else encoder.feed(output))
            assert turn.result is not None
            await sse.send(encoder.finish(turn.result))
        except errors.DroidpoolError as exc:
            # The 200 is already sent: the error goes in-band and the stream ends as the dialect ends one.
            failure = exc
            await sse.send(encoder.failed(exc))
        await response.write_eof()
    except ConnectionResetError:
        turn.client_gone = True
    return response, failure

