"""The command line (click): parses options and calls the programmatic entry points."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import click
import tomli_w

from . import __version__, logs
from .config import Config, ConfigError, field_docs, load

DEFAULT_CONFIG_NAME = "droidpool.toml"


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
    from .service import StartupError
    from .service import serve as run

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
    logs.configure("warning")
    try:
        found = anyio.run(_list_models, config)
    except Exception as exc:  # noqa: BLE001 - reported to the operator, not raised
        raise click.ClickException(str(exc)) from None
    for model in found:
        efforts = ",".join(model.get("supportedReasoningEfforts") or [])
        click.echo(f"{model.get('id')}\t{model.get('displayName', '')}\treasoning: {efforts or '-'}")


async def _list_models(config: Config) -> list[dict[str, Any]]:
    from .service import launch_spec
    from .worker import Worker

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
    """Check the droid binary, its version, a worker start, and the model list."""
    config = _load(config_path, {})
    logs.configure("error")
    ok = anyio.run(_doctor, config)
    sys.exit(0 if ok else 1)


async def _doctor(config: Config) -> bool:
    import subprocess

    from .service import StartupError, launch_spec, resolve_binary
    from .worker import SessionSettings, Worker

    def report(good: bool, what: str, fix: str = "") -> bool:
        click.echo(f"[{'ok' if good else 'FAIL'}] {what}" + (f"\n       fix: {fix}" if fix and not good else ""))
        return good

    try:
        binary = resolve_binary(config.droid.binary)
    except StartupError as exc:
        return report(False, str(exc), "set droid.binary to the droid executable's path")
    report(True, f"droid binary: {binary}")
    try:
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        if not report(version.returncode == 0, f"droid --version: {version.stdout.strip() or version.stderr.strip()}",
                      "the binary does not run: reinstall droid for this platform"):
            return False
    except (OSError, subprocess.TimeoutExpired) as exc:
        return report(False, f"droid --version failed: {exc}")
    worker = Worker(launch_spec(config))
    good = True
    async with anyio.create_task_group() as tg:
        try:
            started = time.monotonic()
            await worker.start(tg)
            models = await worker.list_models(config.pool.spawn_timeout_s)
            report(True, f"worker started and answered in {time.monotonic() - started:.2f} s")
            good = report(bool(models), f"models: {', '.join(str(m.get('id')) for m in models) or 'none'}",
                          "define a BYOK custom model in ~/.factory/settings.json or log in to Factory")
            session = await worker.initialize(SessionSettings(model_id=models[0]["id"] if models else None),
                                              config.pool.spawn_timeout_s)
            report(True, f"session initialized: {session}")
        except Exception as exc:  # noqa: BLE001 - every failure is a finding here
            good = report(False, f"worker failed: {exc} {worker.stderr_tail(300)}",
                          "run the droid binary by hand: droid exec --input-format stream-jsonrpc "
                          "--output-format stream-jsonrpc")
        finally:
            await worker.stop()
            tg.cancel_scope.cancel()
    return good
