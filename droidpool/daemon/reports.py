"""The usage ledger for people: text tables of ``droidpool usage``, ``prices`` and ``estimate``, and
the daily plot (matplotlib, the optional ``plot`` extra)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from droidpool.config import Budget
from droidpool.core.budgets import Window
from droidpool.core.pricing import Price

TOKEN_COLUMNS = (("turns", "turns"), ("failed_turns", "failed"), ("input_tokens", "input"),
                 ("cache_read_tokens", "cache read"), ("cache_creation_tokens", "cache write"),
                 ("output_tokens", "output"), ("standard_tokens", "standard"))


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the first left-aligned, numbers right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 or float(value).is_integer() else f"{value:,.2f}"


def when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch)) if epoch is not None else "-"


def usage_text(report: Mapping[str, Any]) -> str:
    by = list(report["by"])
    with_usd = any(g.get("usd") for g in [*report["groups"], report["total"]])
    header = [*(by or ["total"]), *(label for _, label in TOKEN_COLUMNS), *(["usd"] if with_usd else [])]

    def cells(group: Mapping[str, Any], names: Sequence[str]) -> list[str]:
        out = [*names, *(number(group[k]) for k, _ in TOKEN_COLUMNS)]
        return out + ([f"{group['usd']:.4f}"] if with_usd else [])

    rows = [cells(g, [str(g[d]) for d in by]) for g in report["groups"]]
    rows.append(cells(report["total"], ["TOTAL", *([""] * (len(by) - 1))] if by else ["TOTAL"]))
    span = f"{when(report['since'])} to {when(report['until']) if report['until'] else 'now'}"
    whose = f"key {report['key']!r}" if report["key"] is not None else "every key"
    parts = [f"Usage of {whose}, {span} (standard = weighted tokens x the model's multiplier)", "",
             table(header, rows)]
    if report["budgets"]:
        parts += ["", "Budgets", table(
            ["applies to", "key", "window", "limit", "used", "%", "remaining", "projected", "frees at"],
            [[b["applies_to"], b["key"] or "-", b["window"], f"{number(b['limit'])} {b['unit'].split('_')[0]}",
              number(b["used"]), f"{b['percent']:.1f}" if b["percent"] is not None else "-",
              number(b["remaining"]), number(b["projected"]), when(b["frees_at"])] for b in report["budgets"]])]
    return "\n".join(parts)


def prices_text(prices: Sequence[Price], cached_factor: float) -> str:
    rows = [[p.model, number(p.multiplier) if p.multiplier is not None else "none", p.source,
             "yes" if p.byok else "", p.promo or "", f"{p.usd_per_million:g}" if p.usd_per_million is not None else ""]
            for p in prices]
    return (table(["model", "multiplier", "source", "byok", "promo", "usd/M"], rows)
            + f"\n\ncache reads count {cached_factor:g} of a token (pricing.cached_factor)")


def estimate_text(estimate: Mapping[str, Any]) -> str:
    lines = [f"{estimate['model']}: {number(estimate['tokens'])} tokens x {estimate['multiplier']} "
             f"({estimate['price_source']}) = {number(estimate['standard_tokens'])} standard tokens"
             + ("" if estimate["allowed"] else "  (refused: no known price; see pricing.allow_unpriced)")]
    for b in estimate["budgets"]:
        share = f"{b['percent_of_remaining']:.2f} % of the {number(b['remaining'])} left" \
            if b["percent_of_remaining"] is not None else f"{number(b['remaining'])} left"
        whose = b["key"] or "service"
        lines.append(f"  {b['window']} budget ({whose}): {share}" + (", would exceed it" if b["would_exceed"] else ""))
    return "\n".join(lines)


def daily_series(groups: Sequence[Mapping[str, Any]]) -> tuple[list[str], dict[str, list[float]]]:
    """Days in order and, per model, its standard tokens each day (0 where it had none)."""
    days = sorted({str(g["day"]) for g in groups})
    series: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(days))
    for g in groups:
        series[str(g["model"])][days.index(str(g["day"]))] += float(g["standard_tokens"])
    return days, dict(series)


def daily_budget(budget: Budget) -> float | None:
    """A budget's daily share (limit / its length in days); None for windows under a day."""
    window = Window.parse(budget.window)
    days = window.span_s / 86400 if window.span_s is not None else 30.44
    return budget.limit / days if days >= 1 else None


def plot(groups: Sequence[Mapping[str, Any]], budgets: Sequence[Budget], path: Path, title: str) -> None:
    """Daily standard tokens per model as stacked bars, each budget's daily share as a line."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'droidpool[plot]'") from None
    days, series = daily_series(groups)
    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    bottom = [0.0] * len(days)
    for model, values in sorted(series.items()):
        ax.bar(days, values, bottom=bottom, label=model)
        bottom = [a + b for a, b in zip(bottom, values, strict=True)]
    top = max(bottom, default=0.0)
    colours = iter(["black", "crimson", "dimgray", "purple", "darkgoldenrod"] * 4)
    for budget in budgets:
        share = daily_budget(budget)
        if share is not None and budget.unit == "standard_tokens":
            who = "service" if budget.key == "" else ("each key" if budget.key == "*" else budget.key)
            ax.axhline(share, linestyle="--", linewidth=1.2, color=next(colours),
                       label=f"budget {number(budget.limit)} / {budget.window} ({who}): daily share")
            top = max(top, share)
    ax.set_ylim(0, top * 1.35 or 1)
    ax.set_ylabel("standard tokens per day (UTC)")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", framealpha=0.9)
    ax.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_title(report: Mapping[str, Any]) -> str:
    since = datetime.fromtimestamp(report["since"], UTC).date()
    whose = report["key"] if report["key"] is not None else "all keys"
    return f"droidpool: daily standard tokens by model ({whose}, since {since})"
