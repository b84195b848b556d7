"""Budgets over time windows, decided in pure functions: where a window starts, how full it is,
when it frees enough, what it will hold at this pace, which warnings are due. All times are UTC
epoch seconds."""

from __future__ import annotations

import calendar
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from droidpool.config import WINDOW_PATTERN, Budget
from droidpool.store.base import LedgerEntry

# A budget's use is kept in buckets: a rolling window's are 1/1000 of its span (18 s for 5 h,
# 43 min for 30 days), a monthly cycle's an hour (cycles start at 00:00 UTC). A row counts while
# any of its bucket is in the window, and Retry-After errs late by at most one bucket: both err on
# the side of the budget.
ROLLING_BUCKETS = 1000
CYCLE_BUCKET_S = 3600.0


@dataclass(frozen=True)
class Window:
    """A rolling span (``5h``, ``7d``) or a calendar month starting on ``start_day`` (``monthly:15``;
    a day past a month's end means its last day)."""

    spec: str
    span_s: float | None = None
    start_day: int | None = None

    @classmethod
    def parse(cls, spec: str) -> Window:
        match = re.fullmatch(WINDOW_PATTERN, spec)
        if match is None:
            raise ValueError(f"not a budget window: {spec!r}")
        if match["span"] is not None:
            return cls(spec, span_s=float(match["span"]) * (3600.0 if match["unit"] == "h" else 86400.0))
        return cls(spec, start_day=int(match["day"] or 1))

    @property
    def rolling(self) -> bool:
        return self.span_s is not None

    @property
    def bucket_s(self) -> float:
        return self.span_s / ROLLING_BUCKETS if self.span_s is not None else CYCLE_BUCKET_S

    def start(self, now: float) -> float:
        if self.span_s is not None:
            return now - self.span_s
        assert self.start_day is not None
        return cycle_start(now, self.start_day)

    def end(self, now: float) -> float:
        """When the use counted now stops counting: now + span rolling, the next cycle monthly."""
        if self.span_s is not None:
            return now + self.span_s
        assert self.start_day is not None
        start = datetime.fromtimestamp(cycle_start(now, self.start_day), UTC)
        year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
        return _day_of(year, month, self.start_day)


def _day_of(year: int, month: int, day: int) -> float:
    last = calendar.monthrange(year, month)[1]
    return datetime(year, month, min(day, last), tzinfo=UTC).timestamp()


def cycle_start(now: float, start_day: int) -> float:
    """00:00 UTC of the latest ``start_day`` (clamped to the month's length) at or before ``now``."""
    at = datetime.fromtimestamp(now, UTC)
    this_month = _day_of(at.year, at.month, start_day)
    if this_month <= now:
        return this_month
    year, month = (at.year - 1, 12) if at.month == 1 else (at.year, at.month - 1)
    return _day_of(year, month, start_day)


def frees_at(window: Window, buckets: Sequence[tuple[float, float]], limit: float, now: float) -> float:
    """When the window's use drops below ``limit`` again. ``buckets`` are (bucket start, amount)
    of the rows in the window; a rolling window frees as its oldest rows age out, a cycle at its end."""
    if window.span_s is None:
        return window.end(now)
    if math.fsum(amount for _, amount in buckets) < limit:
        return now
    if limit <= 0:
        return now + window.span_s
    ordered = sorted(buckets)
    for index, (start, _) in enumerate(ordered):
        # what is left once this bucket is gone, summed exactly (fsum: no drift from subtracting)
        if math.fsum(amount for _, amount in ordered[index + 1:]) < limit:
            return start + window.bucket_s + window.span_s
    return now + window.span_s  # pragma: no cover - the last bucket leaves nothing


def projected(window: Window, used: float, recent: float, now: float) -> float:
    """The use the window will hold at its end at the current pace. A cycle extrapolates its use so
    far over its whole length; a rolling window takes the pace of its last quarter (``recent``)."""
    if window.span_s is not None:
        return recent * 4
    start, end = window.start(now), window.end(now)
    elapsed = max(now - start, 1.0)
    return used * (end - start) / elapsed


def applies(budget: Budget, owner: str) -> str | None:
    """The scope of ``budget`` a request by ``owner`` counts against (None: it does not):
    ``""`` the whole service, else the key's own use."""
    if budget.key == "":
        return ""
    if budget.key == "*" or budget.key == owner:
        return owner
    return None


@dataclass(frozen=True)
class BudgetState:
    """A budget as it stands for one scope (``""``: the whole service; else a key)."""

    budget: Budget
    scope: str
    used: float
    now: float
    starts_at: float
    frees_at: float
    projected: float

    @property
    def window(self) -> Window:
        return Window.parse(self.budget.window)

    @property
    def exhausted(self) -> bool:
        return self.used >= self.budget.limit

    @property
    def remaining(self) -> float:
        return max(0.0, self.budget.limit - self.used)

    @property
    def fraction(self) -> float:
        if self.budget.limit <= 0:
            return math.inf if self.used > 0 else 1.0
        return self.used / self.budget.limit

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.scope if self.scope else None,
            "applies_to": {"": "service", "*": "each key"}.get(self.budget.key, self.budget.key),
            "window": self.budget.window,
            "unit": self.budget.unit,
            "limit": self.budget.limit,
            "used": round(self.used, 3),
            "remaining": round(self.remaining, 3),
            "percent": round(100 * self.fraction, 2) if math.isfinite(self.fraction) else None,
            "window_start": self.starts_at,
            "frees_at": self.frees_at if self.exhausted else None,
            "projected": round(self.projected, 3),
        }


class Tally:
    """One budget's use, per scope, in its window's buckets: fed ledger entries as they are
    written, asked how each scope stands. Pure bookkeeping: no I/O, no clock of its own."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.window = Window.parse(budget.window)
        self.scopes: dict[str, dict[float, float]] = {}  # scope → bucket start → amount

    def add(self, entry: LedgerEntry) -> None:
        scope = applies(self.budget, entry.owner)
        if scope is None:
            return
        size = self.window.bucket_s
        start = math.floor(entry.finished_at / size) * size
        amount = entry.factory_credits if self.budget.unit == "factory_credits" else entry.standard_tokens
        buckets = self.scopes.setdefault(scope, {})
        buckets[start] = buckets.get(start, 0.0) + amount

    def prune(self, now: float, scope: str | None = None) -> None:
        """Forget buckets wholly before the window (of one scope, or of all)."""
        cutoff = self.window.start(now) - self.window.bucket_s
        for name in [scope] if scope is not None else list(self.scopes):
            buckets = self.scopes.get(name)
            if buckets is None:
                continue
            for start in [s for s in buckets if s < cutoff]:
                del buckets[start]
            if not buckets:
                del self.scopes[name]

    def state(self, scope: str, now: float) -> BudgetState:
        self.prune(now, scope)
        window, size = self.window, self.window.bucket_s
        start = window.start(now)
        live = [(b, a) for b, a in self.scopes.get(scope, {}).items() if b + size > start]
        used = math.fsum(a for _, a in live)
        recent = math.fsum(a for b, a in live if window.span_s is not None and b + size > now - window.span_s / 4)
        return BudgetState(self.budget, scope, used, now, start, frees_at(window, live, self.budget.limit, now),
                           projected(window, used, recent, now))


def due_warning(thresholds: Sequence[float], fraction: float, warned: float) -> float | None:
    """The highest threshold ``fraction`` has reached that was not warned of yet (``warned``)."""
    reached = [t for t in thresholds if fraction >= t > warned]
    return max(reached) if reached else None
