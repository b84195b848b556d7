"""Running the daemon and setting it up: ``serve``, ``init``, ``doctor``, ``models``, ``hash-key``."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import anyio
import click
import tomli_w

from droidpool.config import Config, field_docs, load
from droidpool.daemon import logs

from .common import DEFAULT_CONFIG_NAME, config_option, droid_models, load_config


@click.command()
@config_option
@click.option("--host", help="Listen address (server.host).")
@click.option("--port", type=int, help="Listen port (server.port).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="server.log_level")
def serve(config_path: Path | None, host: str | None, port: int | None, log_level: str | None) -> None:
    """Serve /v1/chat/completions until SIGTERM or SIGINT."""
    from droidpool.daemon.service import serve as run
    from droidpool.droid.launch import StartupError

    overrides = {"server.host": host, "server.port": port, "server.log_level": log_level}
    config = load_config(config_path, overrides)
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


@click.command()
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


@click.command()
@config_option
def models(config_path: Path | None) -> None:
    """List the models droid offers (droid.list_models from a fresh worker)."""
    config = load_config(config_path, {})
    found = droid_models(config)
    for model in found:
        efforts = ",".join(model.get("supportedReasoningEfforts") or [])
        click.echo(f"{model.get('id')}\t{model.get('displayName', '')}\treasoning: {efforts or '-'}")


@click.command()
@config_option
def doctor(config_path: Path | None) -> None:
    """Check droid, its version and credentials, the state directory, the port, and a worker."""
    from droidpool.daemon.doctor import format_line, run_checks

    config = load_config(config_path, {})
    logs.configure("error")
    ok = anyio.run(run_checks, config, lambda level, what, fix: click.echo(format_line(level, what, fix)))
    sys.exit(0 if ok else 1)


@click.command("hash-key")
@click.option("--key", prompt=True, hide_input=True, help="The API key (prompted for when omitted).")
def hash_key_command(key: str) -> None:
    """Print the sha256 of an API key, for [auth] keys entries."""
    from droidpool.core.access import hash_key

    click.echo(hash_key(key))
