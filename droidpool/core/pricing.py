"""What a turn costs: each model's price (the operator's table, droid's live multiplier) and its standard tokens.

Standard tokens are what Factory's plans count: weighted tokens × the model's multiplier, where

    weighted = input + cache creation + output + cached_factor × cache read

Thinking tokens are not added: droid reports them as a part of the output (it copies OpenAI's
``reasoning_tokens``, which ``output_tokens`` already include; Anthropic counts thinking as
output). droid's own per-turn estimate, ``factoryCredits``, weighs output and cache writes more
(its formula is in docs/droid-behaviour.md); it is kept next to the standard tokens, never mixed with them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from droidpool import errors
from droidpool.droid.protocol import Usage

from .catalog import lookup

PriceSource = Literal["config", "droid", "byok", "unpriced"]
CostSource = Literal["droid_reported", "config", "droid", "byok", "unpriced"]


@dataclass(frozen=True)
class Price:
    """A model's multiplier and where it comes from: the operator's ``[pricing]`` table, droid's
    live ``tokenMultiplier``, free because BYOK, or none known."""

    model: str
    multiplier: float | None
    source: PriceSource
    usd_per_million: float | None = None
    byok: bool = False
    promo: str | None = None  # droid's promoLabel (its multiplier already has the discount)

    @property
    def priced(self) -> bool:
        return self.multiplier is not None

    def to_json(self) -> dict[str, Any]:
        return {"multiplier": self.multiplier, "price_source": self.source, "byok": self.byok,
                "usd_per_million": self.usd_per_million, "promo": self.promo}


@dataclass(frozen=True)
class Cost:
    """One turn's cost, as the ledger keeps it."""

    standard_tokens: float
    multiplier: float | None
    source: CostSource
    usd: float | None = None
    factory_credits: float = 0.0



def is_byok(model_id: str, info: Mapping[str, Any]) -> bool:
    """A custom model the operator brought (droid names them ``custom:...``): Factory bills nothing."""
    return model_id.startswith("custom:") or info.get("isCustom") is True


def droid_multiplier(info: Mapping[str, Any]) -> float | None:
    value = info.get("tokenMultiplier")
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


def weighted_tokens(usage: Usage, cached_factor: float) -> float:
    return (usage.input_tokens + usage.cache_creation_tokens + usage.output_tokens
            + cached_factor * usage.cache_read_tokens)


@dataclass(frozen=True)
class Pricing:
    """The operator's ``[pricing]`` table over droid's live multipliers."""

    multipliers: Mapping[str, float]
    cached_factor: float = 0.1
    usd_per_million: Mapping[str, float] | None = None
    allow_unpriced: bool = False

    def price(self, model_id: str, info: Mapping[str, Any]) -> Price:
        usd = lookup(self.usd_per_million or {}, model_id, None)
        byok = is_byok(model_id, info)
        promo = info.get("promoLabel")
        promo = promo.strip(" ,") if isinstance(promo, str) and promo.strip(" ,") else None
        configured = lookup(self.multipliers, model_id, None)
        if configured is not None:
            return Price(model_id, configured, "config", usd, byok, promo)
        live = droid_multiplier(info)
        if live is not None:
            return Price(model_id, live, "droid", usd, byok, promo)
        if byok:
            return Price(model_id, 0.0, "byok", usd, True)
        return Price(model_id, None, "unpriced", usd)

    def table(self, models: Sequence[Mapping[str, Any]]) -> list[Price]:
        return [self.price(str(m["id"]), m) for m in models if isinstance(m.get("id"), str)]

    def cost(self, price: Price, usage: Usage) -> Cost:
        weighted = weighted_tokens(usage, self.cached_factor)
        usd = price.usd_per_million * weighted / 1e6 if price.usd_per_million is not None else None
        source: CostSource = "droid_reported" if usage.factory_credits > 0 else price.source
        return Cost(weighted * (price.multiplier or 0.0), price.multiplier, source, usd, usage.factory_credits)

    def allows(self, price: Price, key_allows_unpriced: bool = False) -> bool:
        return price.priced or self.allow_unpriced or key_allows_unpriced

    def check(self, price: Price, key_allows_unpriced: bool = False) -> None:
        """Refuse a Factory model with no known multiplier: nobody can say what it would cost."""
        if not self.allows(price, key_allows_unpriced):
            raise errors.Forbidden(
                f"The model {price.model!r} has no known price multiplier (droid lists none and "
                "[pricing] multipliers has none), so its cost cannot be counted. Set one in "
                "pricing.multipliers, or allow unpriced models (pricing.allow_unpriced, or the key's "
                "allow_unpriced).", param="model", code="model_unpriced")
