"""What the commands share: the ``--config`` option, the config, the store, droid's model list."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import click

from droidpool.config import Config, ConfigError, load, store_url
from droidpool.daemon import logs
from droidpool.store import SessionStore, open_store

DEFAULT_CONFIG_NAME = "droidpool.toml"
T = TypeVar("T")


def load_config(config_path: Path | None, overrides: dict[str, Any]) -> Config:
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


async def with_store(config: Config, action: Callable[[SessionStore], Awaitable[T]], missing_ok: bool = False) -> T:
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


def droid_models(config: Config) -> list[dict[str, Any]]:
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
