"""The store read directly, whether the daemon runs or not: ``sessions ...`` and ``nodes``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import anyio
import click

from droidpool.droid.sessions import apply_prune, droid_sessions_dir, plan_prune
from droidpool.store import SessionStore

from .common import config_option, load_config, with_store


@click.group()
def sessions() -> None:
    """Inspect and clean up the session store and droid's session files."""


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

    config = load_config(config_path, {})
    page = anyio.run(with_store, config, lambda store: store.page(limit, expired=expired))
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

    config = load_config(config_path, {})
    record = anyio.run(with_store, config, lambda store: store.get(session_id))
    if record is None:
        raise click.ClickException(f"no session {session_id!r} (unknown or expired)")
    click.echo(json.dumps(record.public(config.store.session_ttl_s), indent=2))


@sessions.command("drop")
@config_option
@click.argument("session_ids", nargs=-1, required=True)
def sessions_drop(config_path: Path | None, session_ids: tuple[str, ...]) -> None:
    """Forget sessions: no request reaches them again (droid's files stay; see prune-files)."""
    config = load_config(config_path, {})

    async def drop(store: SessionStore) -> list[bool]:
        return [await store.delete(session_id) for session_id in session_ids]

    results = anyio.run(with_store, config, drop)
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
    config = load_config(config_path, {})
    sessions_dir = droid_sessions_dir(config)
    known: dict[str, bool] = {}
    if config.store_path.is_file():
        known = anyio.run(with_store, config, lambda store: store.all_ids())
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


@click.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="As JSON.")
def nodes(config_path: Path | None, as_json: bool) -> None:
    """The nodes sharing the store: their state, last heartbeat and the sessions they hold."""
    import orjson

    from droidpool.daemon import reports

    config = load_config(config_path, {})
    found = anyio.run(with_store, config, lambda store: store.nodes(sessions=True))
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
