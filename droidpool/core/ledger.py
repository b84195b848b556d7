"""The usage ledger's policy: what a turn costs, whether a model may run, whether a key is within its
budgets, and the warnings and counters that follow. The rows live in the store (``turns``)."""

from __future__ import annotations

import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import anyio
import structlog

from droidpool import errors
from droidpool.config import Budget
from droidpool.droid.protocol import Usage
from droidpool.store.base import (
    DIMENSIONS as DIMENSIONS,  # re-exported: the api takes them from here
)
from droidpool.store.base import Dimension as Dimension
from droidpool.store.base import LedgerGroup, LedgerQuery, LedgerStore, TurnRow

from .budgets import BudgetState, Tally, applies, due_warning
from .catalog import Catalog
from .pricing import Cost, Price, Pricing

log = structlog.get_logger(__name__)

MAX_WARNED = 4096  # (budget, scope, window start) entries remembered for warnings
SYNC_PAGE = 5000  # ledger entries read at a time
PRUNE_EVERY_S = 60.0  # how often every scope's old buckets are dropped


@dataclass
class Ledger:
    """Prices turns and keeps keys within their budgets; ``store`` holds the rows it sums."""

    store: LedgerStore
    catalog: Catalog
    pricing: Pricing = field(default_factory=lambda: Pricing({}))
    budgets: tuple[Budget, ...] = ()
    warn_at: tuple[float, ...] = (0.8, 0.95)
    clock: Callable[[], float] = time.time
    standard_tokens: defaultdict[tuple[str, str], float] = field(
        default_factory=lambda: defaultdict(float))  # (model, key) → total
    warnings: Counter[tuple[str, str]] = field(default_factory=Counter)  # (window, threshold) → count
    last_ratio: dict[tuple[str, str], float] = field(default_factory=dict)  # (window, scope) → used / limit
    _warned: dict[tuple[int, str, float], float] = field(default_factory=dict)
    _tallies: list[Tally] | None = None  # one per budget, built on the first sync
    _seq: int = 0  # the last ledger entry folded into them
    _pruned_at: float = 0.0
    _sync_lock: anyio.Lock = field(default_factory=anyio.Lock)

    def now(self) -> float:
        return self.clock()

    def reconfigure(self, pricing: Pricing, budgets: tuple[Budget, ...], warn_at: tuple[float, ...]) -> None:
        """New prices and budgets (SIGHUP); the rows already written keep the cost they had."""
        self.pricing, self.budgets, self.warn_at = pricing, budgets, warn_at
        self._tallies = None  # rebuilt from the store on the next sync
        self._warned.clear()
        self.last_ratio.clear()

    # --- prices ---------------------------------------------------------------------------------

    def price(self, model_id: str) -> Price:
        return self.pricing.price(model_id, self.catalog.info(model_id))

    def prices(self) -> list[Price]:
        return self.pricing.table(self.catalog.models())

    def check_model(self, model_id: str, allow_unpriced: bool = False) -> Price:
        """The model's price; 403 ``model_unpriced`` for a Factory model nobody priced."""
        price = self.price(model_id)
        self.pricing.check(price, allow_unpriced)
        return price

    def cost(self, model_id: str, usage: Usage) -> Cost:
        return self.pricing.cost(self.price(model_id), usage)

    @staticmethod
    def priced_row(row: TurnRow, cost: Cost) -> TurnRow:
        """``row`` with its cost filled in."""
        return replace(row, standard_tokens=cost.standard_tokens, multiplier=cost.multiplier,
                       cost_source=cost.source, usd=cost.usd)

    def recorded(self, row: TurnRow) -> None:
        """A ledger row was written: count it for the metrics."""
        self.standard_tokens[(row.droid_model or row.model, row.owner)] += row.standard_tokens

    # --- budgets --------------------------------------------------------------------------------

    def applicable(self, owner: str | None) -> list[tuple[int, Budget, str]]:
        """(index, budget, scope) of every budget ``owner`` counts against; None: every budget of
        every scope that has one fixed (the service's and named keys')."""
        out = []
        for index, budget in enumerate(self.budgets):
            if owner is None:
                if budget.key != "*":
                    out.append((index, budget, budget.key))
                continue
            scope = applies(budget, owner)
            if scope is not None:
                out.append((index, budget, scope))
        return out

    async def sync(self) -> None:
        """Fold the ledger rows written since the last sync (by this process or any other sharing
        the store) into the budgets' tallies; the first sync reads the windows' rows once."""
        if not self.budgets:
            return
        async with self._sync_lock:
            if self._tallies is None:
                self._tallies, self._seq = [Tally(b) for b in self.budgets], 0
            now = self.now()
            since = min(t.window.start(now) - t.window.bucket_s for t in self._tallies)
            while True:
                entries = await self.store.ledger_entries(self._seq, since, SYNC_PAGE)
                for entry in entries:
                    for tally in self._tallies:
                        tally.add(entry)
                if entries:
                    self._seq = entries[-1].seq
                if len(entries) < SYNC_PAGE:
                    break
            if now - self._pruned_at > PRUNE_EVERY_S:
                for tally in self._tallies:
                    tally.prune(now)
                self._pruned_at = now

    async def states(self, owner: str | None) -> list[BudgetState]:
        """Each budget ``owner`` counts against; None: every budget, a ``*`` budget once for each
        key with use in its window."""
        await self.sync()
        if self._tallies is None:
            return []
        now = self.now()
        out = [self._tallies[index].state(scope, now) for index, _, scope in self.applicable(owner)]
        if owner is None:
            for tally in (t for t in self._tallies if t.budget.key == "*"):
                out += [tally.state(scope, now) for scope in sorted(tally.scopes)]
        return out

    async def report(self, since: float, until: float, owner: str | None,
                     by: tuple[Dimension, ...] = ()) -> dict[str, Any]:
        """The ledger's totals over [since, until) for ``owner`` (None: everyone), grouped ``by``,
        with each budget's use, percentage and projection: what ``GET /v1/usage`` and ``droidpool
        usage --json`` return."""
        groups = await self.store.ledger(LedgerQuery(since, until, owner, by)) if by else []
        total = await self.store.ledger(LedgerQuery(since, until, owner))
        empty = LedgerGroup((), 0, 0, Usage(), 0.0, 0.0)
        return {
            "object": "droidpool.usage",
            "since": since, "until": until if math.isfinite(until) else None,
            "key": owner, "by": list(by),
            "groups": [g.to_json(by) for g in groups],
            "total": (total[0] if total else empty).to_json(()),
            "budgets": [state.to_json() for state in await self.states(owner)],
        }

    async def admit(self, owner: str) -> None:
        """Before a turn reaches droid: 429 ``insufficient_quota`` if one of the budgets ``owner``
        counts against is used up, with Retry-After when it frees enough; warnings as they fall due."""
        if not self.budgets:
            return
        await self.sync()
        assert self._tallies is not None
        now = self.now()
        for index, budget, scope in self.applicable(owner):
            state = self._tallies[index].state(scope, now)
            self._warn(index, state)
            if state.exhausted:
                whose = "this service's" if budget.key == "" else f"API key {scope!r}'s"
                unit = budget.unit.replace("_", " ")
                raise errors.QuotaExceeded(
                    f"Quota exceeded: {whose} budget of {budget.limit:,.0f} {unit} per {budget.window} is used "
                    f"up ({state.used:,.0f} used); it frees enough at "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(state.frees_at))}.",
                    retry_after=max(1.0, state.frees_at - now))

    def _warn(self, index: int, state: BudgetState) -> None:
        if len(self.last_ratio) < MAX_WARNED or (state.budget.window, state.scope) in self.last_ratio:
            self.last_ratio[(state.budget.window, state.scope)] = min(state.fraction, 1e9)
        key = (index, state.scope, state.starts_at if not state.window.rolling else 0.0)
        warned = self._warned.get(key, 0.0)
        threshold = due_warning(self.warn_at, state.fraction, warned)
        if threshold is None:
            if state.fraction < min(self.warn_at, default=1.0) and warned:
                self._warned.pop(key, None)  # back under every threshold: warn again next time
            return
        if len(self._warned) >= MAX_WARNED:
            self._warned.clear()
        self._warned[key] = threshold
        self.warnings[(state.budget.window, f"{threshold:g}")] += 1
        log.warning("budget.threshold", window=state.budget.window, key=state.scope or None,
                    applies_to=state.budget.key or "service", threshold=threshold,
                    used=round(state.used, 1), limit=state.budget.limit, unit=state.budget.unit)

    async def estimate(self, model_id: str, tokens: float, owner: str | None) -> dict[str, object]:
        """What ``tokens`` weighted tokens on ``model_id`` would cost, against each budget left."""
        price = self.price(model_id)
        standard = tokens * (price.multiplier or 0.0)
        budgets = []
        for state in await self.states(owner):
            share = None
            if state.budget.unit == "standard_tokens" and state.remaining > 0:
                share = round(100 * standard / state.remaining, 2)
            budgets.append({**state.to_json(), "percent_of_remaining": share,
                            "would_exceed": state.budget.unit == "standard_tokens" and standard > state.remaining})
        return {"object": "droidpool.estimate", "model": model_id, "tokens": tokens, **price.to_json(),
                "standard_tokens": round(standard, 3), "allowed": self.pricing.allows(price), "budgets": budgets}


def parse_time(text: str, now: float) -> float:
    """A report bound: epoch seconds, an ISO date or time (UTC unless it names a zone), or a span
    back from now (``90m``, ``5h``, ``7d``)."""
    text = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([mhd])", text)
    if match:
        return now - float(match[1]) * {"m": 60, "h": 3600, "d": 86400}[match[2]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a time: give an ISO date (2026-12-01), a time, epoch "
                         "seconds, or a span back from now (5h, 7d)") from None
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()
