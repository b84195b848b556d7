"""The usage ledger from the command line: ``usage``, ``prices``, ``estimate``."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import anyio
import click

from droidpool.config import Config
from droidpool.store import SessionStore, SqliteStore

from .common import config_option, droid_models, load_config, with_store


def _ledger(config: Config, store: SessionStore, models: list[dict[str, Any]] | None = None) -> Any:
    from droidpool.core.catalog import Catalog
    from droidpool.daemon.service import build_ledger

    return build_ledger(config, store, Catalog(lambda: models or [], configured=[m.id for m in config.pool.models]))


def _time(text: str | None, default: float) -> float:
    from droidpool.core.ledger import parse_time

    if not text:
        return default
    try:
        return parse_time(text, time.time())
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
@config_option
@click.option("--since", help="Start: an ISO date or time (UTC), epoch seconds, or a span back (7d). Default 30d.")
@click.option("--until", help="End (exclusive), same forms; default now.")
@click.option("--by", "by", default="", help="Group by key, model, session, day, dialect or status (comma-separated).")
@click.option("--key", help="Only this API key's turns.")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON (as GET /v1/usage returns it).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw daily standard tokens per model against the budgets (PNG; needs droidpool[plot]).")
def usage(config_path: Path | None, since: str | None, until: str | None, by: str, key: str | None,
          as_json: bool, plot_path: Path | None) -> None:
    """The usage ledger: tokens and standard tokens per group, totals, and each budget's use."""
    import orjson

    from droidpool.api.usage import dimensions
    from droidpool.daemon import reports
    from droidpool.errors import DroidpoolError

    config = load_config(config_path, {})
    try:
        dims = dimensions(by)
    except DroidpoolError as exc:
        raise click.BadParameter(exc.message, param_hint="--by") from None
    start, end = _time(since, time.time() - 30 * 86400), _time(until, float("inf"))

    async def run(store: SessionStore) -> tuple[dict[str, Any], dict[str, Any] | None]:
        ledger = _ledger(config, store)
        report = await ledger.report(start, end, key, dims)
        daily = await ledger.report(start, end, key, ("day", "model")) if plot_path is not None else None
        return report, daily

    report, daily = anyio.run(with_store, config, run)
    click.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() if as_json else reports.usage_text(report))
    if plot_path is not None and daily is not None:
        try:
            reports.plot(daily["groups"], config.budgets.limits, plot_path, reports.plot_title(daily))
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"wrote {plot_path}", err=as_json)


@click.command()
@config_option
@click.option("--check", is_flag=True, help="Only the models droid offers with no price; exit 1 if there are any.")
@click.option("--json", "as_json", is_flag=True, help="As JSON.")
def prices(config_path: Path | None, check: bool, as_json: bool) -> None:
    """Each model's price multiplier and its source: pricing.multipliers, droid's live list, BYOK (free)."""
    import orjson

    from droidpool.daemon import reports

    config = load_config(config_path, {})
    found = droid_models(config)
    table = _ledger(config, SqliteStore(Path(":memory:"), 0), found).prices()  # prices need no store
    if check:
        table = [p for p in table if not p.priced]
    if as_json:
        click.echo(orjson.dumps([{"model": p.model, **p.to_json()} for p in table], option=orjson.OPT_INDENT_2).decode())
    elif check and not table:
        click.echo("every model droid offers has a price")
    else:
        click.echo(reports.prices_text(table, config.pricing.cached_factor))
    if check and table:
        sys.exit(1)


@click.command()
@config_option
@click.argument("model")
@click.argument("tokens", type=click.FloatRange(min=0))
@click.option("--key", help="Against this API key's budgets (default: the service's and every named key's).")
@click.option("--json", "as_json", is_flag=True, help="As JSON (as POST /v1/usage/estimate returns it).")
def estimate(config_path: Path | None, model: str, tokens: float, key: str | None, as_json: bool) -> None:
    """The standard tokens TOKENS weighted tokens on MODEL cost, and their share of each budget left."""
    import orjson

    from droidpool.daemon import reports
    from droidpool.errors import DroidpoolError

    config = load_config(config_path, {})
    found = droid_models(config)

    async def run(store: SessionStore) -> dict[str, Any]:
        ledger = _ledger(config, store, found)
        model_id = ledger.catalog.resolve(model)
        return dict(await ledger.estimate(model_id, tokens, key))

    try:
        result = anyio.run(with_store, config, run, True)
    except DroidpoolError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() if as_json else reports.estimate_text(result))
