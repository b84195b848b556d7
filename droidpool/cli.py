"""The command line (click): parses options and calls the programmatic entry points."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import click
import tomli_w

from droidpool import __version__
from droidpool.config import Config, ConfigError, field_docs, load, store_url
from droidpool.daemon import logs
from droidpool.droid.sessions import apply_prune, droid_sessions_dir, plan_prune
from droidpool.store import SessionStore, SqliteStore, open_store

DEFAULT_CONFIG_NAME = "droidpool.toml"
T = TypeVar("T")


def _load(config_path: Path | None, overrides: dict[str, Any]) -> Config:
    if config_path is None and Path(DEFAULT_CONFIG_NAME).is_file():
        config_path = Path(DEFAULT_CONFIG_NAME)
    try:
        return load(config_path, overrides={k: v for k, v in overrides.items() if v is not None})
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None


config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
    help=f"Config file (default: ./{DEFAULT_CONFIG_NAME} if present).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="droidpool")
def main() -> None:
    """droidpool: an OpenAI-compatible server over a pool of warm Factory droid workers."""


@main.command()
@config_option
@click.option("--host", help="Listen address (server.host).")
@click.option("--port", type=int, help="Listen port (server.port).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="server.log_level")
def serve(config_path: Path | None, host: str | None, port: int | None, log_level: str | None) -> None:
    """Serve /v1/chat/completions until SIGTERM or SIGINT."""
    from droidpool.daemon.service import serve as run
    from droidpool.droid.launch import StartupError

    overrides = {"server.host": host, "server.port": port, "server.log_level": log_level}
    config = _load(config_path, overrides)
    logs.configure(config.server.log_level)

    def reload() -> Config:
        """SIGHUP: the same file, environment and flags, read again."""
        return load(config_path, overrides={k: v for k, v in overrides.items() if v is not None})

    if config_path is None and Path(DEFAULT_CONFIG_NAME).is_file():
        config_path = Path(DEFAULT_CONFIG_NAME)
    try:
        anyio.run(run, config, reload)
    except StartupError as exc:
        raise click.ClickException(str(exc)) from None
    except BaseExceptionGroup as group:
        startup = group.subgroup(StartupError)
        if startup is None:
            raise
        leaf: BaseException = startup
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        raise click.ClickException(str(leaf)) from None
    except KeyboardInterrupt:
        pass


@main.command()
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              default=Path(DEFAULT_CONFIG_NAME), show_default=True, help="Where to write; - for stdout.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(output: Path, force: bool) -> None:
    """Write a config file with every key at its default, commented."""
    text = render_default_config()
    if str(output) == "-":
        click.echo(text, nl=False)
        return
    if output.exists() and not force:
        raise click.ClickException(f"{output} exists; use --force to overwrite")
    output.write_text(text)
    click.echo(f"wrote {output}")


def render_default_config() -> str:
    lines = [
        "# droidpool configuration. Every key is shown with its default.",
        "# Precedence: defaults < this file < DROIDPOOL_<SECTION>_<KEY> environment < CLI flags.",
        "",
    ]
    defaults = Config()
    for section in dataclasses.fields(Config):
        value = getattr(defaults, section.name)
        lines.append(f"[{section.name}]")
        docs = field_docs(type(value))
        for f in dataclasses.fields(value):
            current = getattr(value, f.name)
            if isinstance(current, tuple):
                current = [
                    dataclasses.asdict(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v
                    for v in current
                ]
            lines.append(f"# {docs[f.name]}")
            if isinstance(current, str | int | float | bool | list):
                lines.append(tomli_w.dumps({f.name: current}).strip())
            else:  # a table of strings, written inline so it stays inside its section
                items = ", ".join(tomli_w.dumps({k: v}).strip() for k, v in current.items())
                lines.append(f"{f.name} = {{{items}}}" if items else f"{f.name} = {{}}")
        lines.append("")
    return "\n".join(lines)


@main.command()
@config_option
def models(config_path: Path | None) -> None:
    """List the models droid offers (droid.list_models from a fresh worker)."""
    config = _load(config_path, {})
    found = _droid_models(config)
    for model in found:
        efforts = ",".join(model.get("supportedReasoningEfforts") or [])
        click.echo(f"{model.get('id')}\t{model.get('displayName', '')}\treasoning: {efforts or '-'}")


def _droid_models(config: Config) -> list[dict[str, Any]]:
    """droid's model list, from a fresh worker started for it."""
    logs.configure("warning")
    try:
        return anyio.run(_list_models, config)
    except Exception as exc:  # noqa: BLE001 - reported to the operator, not raised
        raise click.ClickException(str(exc)) from None


async def _list_models(config: Config) -> list[dict[str, Any]]:
    from droidpool.droid.launch import launch_spec
    from droidpool.droid.worker import Worker

    worker = Worker(launch_spec(config))
    async with anyio.create_task_group() as tg:
        try:
            await worker.start(tg)
            with anyio.fail_after(config.pool.spawn_timeout_s):
                return await worker.list_models(config.pool.spawn_timeout_s)
        finally:
            await worker.stop()
            tg.cancel_scope.cancel()
    return []  # pragma: no cover


@main.command()
@config_option
def doctor(config_path: Path | None) -> None:
    """Check droid, its version and credentials, the state directory, the port, and a worker."""
    from droidpool.daemon.doctor import format_line, run_checks

    config = _load(config_path, {})
    logs.configure("error")
    ok = anyio.run(run_checks, config, lambda level, what, fix: click.echo(format_line(level, what, fix)))
    sys.exit(0 if ok else 1)


@main.command("hash-key")
@click.option("--key", prompt=True, hide_input=True, help="The API key (prompted for when omitted).")
def hash_key_command(key: str) -> None:
    """Print the sha256 of an API key, for [auth] keys entries."""
    from droidpool.core.access import hash_key

    click.echo(hash_key(key))


# --- sessions: the session store, used directly (the daemon may be running or not) ------------


@main.group()
def sessions() -> None:
    """Inspect and clean up the session store and droid's session files."""


async def _with_store(config: Config, action: Callable[[SessionStore], Awaitable[T]], missing_ok: bool = False) -> T:
    """Run ``action`` on the store (``store.url``, else the SQLite file); ``missing_ok``: on an
    empty one (in memory) if there is no SQLite file yet."""
    path = config.store_path
    url = store_url(config, os.environ)
    if not url and not path.is_file():
        if not missing_ok:
            raise click.ClickException(f"no session store at {path}")
        path = Path(":memory:")
    store = open_store(url, path, config.store.session_ttl_s)
    await store.open()
    try:
        return await action(store)
    finally:
        await store.close()


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


@sessions.command("list")
@config_option
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True, help="At most this many.")
@click.option("--expired", is_flag=True, help="Include expired sessions (not yet swept).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def sessions_list(config_path: Path | None, limit: int, expired: bool, as_json: bool) -> None:
    """List sessions, most recently updated first."""
    import json

    config = _load(config_path, {})
    page = anyio.run(_with_store, config, lambda store: store.page(limit, expired=expired))
    ttl = config.store.session_ttl_s
    for record in page.records:
        if as_json:
            click.echo(json.dumps(record.public(ttl)))
            continue
        flags = ",".join(f for f, on in (("diverged", record.diverged), ("in_flight", record.in_flight),
                                         ("expired", record.updated_at + ttl < time.time())) if on)
        click.echo("\t".join([record.session_id, record.model, f"turns={record.turns}",
                              f"updated={_when(record.updated_at)}",
                              f"conversation={record.conversation_key or '-'}", flags or "-"]))
    if page.has_more and not as_json:
        click.echo(f"(more than {limit}; use --limit)", err=True)


@sessions.command("show")
@config_option
@click.argument("session_id")
def sessions_show(config_path: Path | None, session_id: str) -> None:
    """Print one live session as JSON."""
    import json

    config = _load(config_path, {})
    record = anyio.run(_with_store, config, lambda store: store.get(session_id))
    if record is None:
        raise click.ClickException(f"no session {session_id!r} (unknown or expired)")
    click.echo(json.dumps(record.public(config.store.session_ttl_s), indent=2))


@sessions.command("drop")
@config_option
@click.argument("session_ids", nargs=-1, required=True)
def sessions_drop(config_path: Path | None, session_ids: tuple[str, ...]) -> None:
    """Forget sessions: no request reaches them again (droid's files stay; see prune-files)."""
    config = _load(config_path, {})

    async def drop(store: SessionStore) -> list[bool]:
        return [await store.delete(session_id) for session_id in session_ids]

    results = anyio.run(_with_store, config, drop)
    for session_id, dropped in zip(session_ids, results, strict=True):
        click.echo(f"{'dropped' if dropped else 'no such session'}\t{session_id}")
    if not all(results):
        sys.exit(1)


@sessions.command("prune-files")
@config_option
@click.option("--apply", is_flag=True, help="Delete the files (default: only list them).")
@click.option("--min-age", "min_age_s", type=click.FloatRange(min=0), default=None,
              help="Seconds an unknown session must be untouched (default: store.session_ttl_s).")
def sessions_prune_files(config_path: Path | None, apply: bool, min_age_s: float | None) -> None:
    """Delete droid's session files that droidpool no longer knows or that expired.

    Looks only in <droid HOME>/.factory/sessions, at sessions droid ran in droidpool's worker
    cwd (droid.cwd, default <state_dir>/work), and at the per-session working directories
    under <worker cwd>/sessions. Dry run unless --apply.
    """
    config = _load(config_path, {})
    sessions_dir = droid_sessions_dir(config)
    known: dict[str, bool] = {}
    if config.store_path.is_file():
        known = anyio.run(_with_store, config, lambda store: store.all_ids())
    age = config.store.session_ttl_s if min_age_s is None else min_age_s
    plan = plan_prune(sessions_dir, config.worker_cwd, known, time.time(), age)
    verb = "deleted" if apply else "would delete"
    freed = plan.bytes
    for session, why in plan.sessions:
        size = sum(p.stat().st_size for p in session.paths if p.exists())
        click.echo(f"{verb}\t{session.session_id}\t{why}\t{size} bytes")
    for path in plan.workdirs:
        click.echo(f"{verb}\t{path}\tworking directory")
    if apply:
        apply_prune(plan)
    click.echo(f"{len(plan.sessions)} session(s), {freed} bytes and {len(plan.workdirs)} working directories "
               f"{'deleted' if apply else 'to delete (dry run: --apply)'}; {plan.kept} kept; in {sessions_dir}",
               err=True)


# --- the usage ledger ---------------------------------------------------------------------------


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


@main.command()
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

    config = _load(config_path, {})
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

    report, daily = anyio.run(_with_store, config, run)
    click.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() if as_json else reports.usage_text(report))
    if plot_path is not None and daily is not None:
        try:
            reports.plot(daily["groups"], config.budgets.limits, plot_path, reports.plot_title(daily))
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"wrote {plot_path}", err=as_json)


@main.command()
@config_option
@click.option("--check", is_flag=True, help="Only the models droid offers with no price; exit 1 if there are any.")
@click.option("--json", "as_json", is_flag=True, help="As JSON.")
def prices(config_path: Path | None, check: bool, as_json: bool) -> None:
    """Each model's price multiplier and its source: pricing.multipliers, droid's live list, BYOK (free)."""
    import orjson

    from droidpool.daemon import reports

    config = _load(config_path, {})
    found = _droid_models(config)
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


@main.command()
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

    config = _load(config_path, {})
    found = _droid_models(config)

    async def run(store: SessionStore) -> dict[str, Any]:
        ledger = _ledger(config, store, found)
        model_id = ledger.catalog.resolve(model)
        return dict(await ledger.estimate(model_id, tokens, key))

    try:
        result = anyio.run(_with_store, config, run, True)
    except DroidpoolError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() if as_json else reports.estimate_text(result))


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="As JSON.")
def nodes(config_path: Path | None, as_json: bool) -> None:
    """The nodes sharing the store: their state, last heartbeat and the sessions they hold."""
    import orjson

    from droidpool.daemon import reports

    config = _load(config_path, {})
    found = anyio.run(_with_store, config, lambda store: store.nodes(sessions=True))
    now = time.time()
    rows = [{"id": n.node_id, "url": n.url, "state": n.state if now - n.heartbeat_at <= config.nodes.dead_after_s
             else "dead", "heartbeat_age_s": round(now - n.heartbeat_at, 1), "capacity": n.capacity,
             "sessions": n.sessions, "started_at": n.started_at} for n in found]
    if as_json:
        click.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    elif not rows:
        click.echo("no nodes registered (nodes.url is not set on any node)")
    else:
        click.echo(reports.table(["node", "url", "state", "heartbeat", "capacity", "sessions"],
                                 [[r["id"], r["url"], r["state"], f"{r['heartbeat_age_s']} s ago", str(r["capacity"]),
                                   str(r["sessions"])] for r in rows]))
