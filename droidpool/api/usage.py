"""The usage routes: the ledger's totals and budgets (``GET /v1/usage``), and cost estimates."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast

from aiohttp import web

from droidpool import errors
from droidpool.core.access import ANONYMOUS, Principal
from droidpool.core.catalog import Listed
from droidpool.core.ledger import DIMENSIONS, Dimension, Ledger, parse_time

from .context import PRINCIPAL, TURNS, json_response, read_json


def scope(principal: Principal, asked: str | None) -> str | None:
    """Whose use a caller sees: their own key's; an admin key (or the unauthenticated operator, when
    there are no keys) everyone's, or one key's with ``key``."""
    if principal.admin or principal is ANONYMOUS:
        return asked if asked else None
    if asked and asked != principal.name:
        raise errors.Forbidden("Only an admin key may see another key's usage.", param="key", code="not_admin")
    return principal.name


def dimensions(raw: str | None) -> tuple[Dimension, ...]:
    if not raw:
        return ()
    names = [d.strip() for d in raw.split(",") if d.strip()]
    unknown = [d for d in names if d not in DIMENSIONS or d == "bucket"]
    if unknown:
        raise errors.InvalidRequest(f"'by' may be key, model, session, day, dialect or status; got {unknown[0]!r}.",
                                    param="by")
    return tuple(cast(Dimension, d) for d in names)


def bounds(query: Mapping[str, str], now: float) -> tuple[float, float]:
    try:
        since = parse_time(query["since"], now) if query.get("since") else now - 30 * 86400
        until = parse_time(query["until"], now) if query.get("until") else math.inf
    except ValueError as exc:
        raise errors.InvalidRequest(str(exc), param="since" if "since" in str(exc) else "until") from None
    return since, until


async def get_usage(request: web.Request) -> web.Response:
    ledger = request.app[TURNS].ledger
    owner = scope(request[PRINCIPAL], request.query.get("key"))
    since, until = bounds(request.query, ledger.now())
    return json_response(await ledger.report(since, until, owner, dimensions(request.query.get("by"))))


async def estimate(request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise errors.InvalidRequest("The body must be a JSON object: {\"model\": ..., \"tokens\": ...}.")
    model, tokens = body.get("model"), body.get("tokens")
    if not isinstance(model, str) or not model:
        raise errors.InvalidRequest("'model' must be a model name.", param="model")
    if not isinstance(tokens, int | float) or isinstance(tokens, bool) or not 0 <= tokens < 1e15:
        raise errors.InvalidRequest("'tokens' must be a number of tokens, 0 or more.", param="tokens")
    service = request.app[TURNS]
    model_id = service.catalog.resolve(model)
    principal = request[PRINCIPAL]
    owner = scope(principal, body.get("key") if isinstance(body.get("key"), str) else None)
    result = await service.ledger.estimate(model_id, float(tokens), owner)
    result["allowed"] = allowed(service.ledger, principal, model_id)
    return json_response(result)


def allowed(ledger: Ledger, principal: Principal, model_id: str) -> bool:
    return principal.allows_model(model_id) and ledger.pricing.allows(ledger.price(model_id),
                                                                      principal.allow_unpriced)


def model_extension(ledger: Ledger, principal: Principal, model: Listed) -> dict[str, Any]:
    """The ``droidpool`` field of a ``/v1/models`` entry: its price, and may this key use it."""
    target = model.alias_of or model.id
    price = ledger.price(target)
    ext: dict[str, Any] = {"multiplier": price.multiplier, "price_source": price.source,
                           "allowed": allowed(ledger, principal, target) and principal.allows_model(model.id)}
    if price.promo:
        ext["promo"] = price.promo
    if model.alias_of is not None:
        ext["alias_of"] = model.alias_of
    return ext


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v1/usage", get_usage)
    router.add_post("/v1/usage/estimate", estimate)
