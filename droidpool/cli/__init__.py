"""The command line (click): parses options and calls the programmatic entry points."""

from __future__ import annotations

import click

from droidpool import __version__

from .ledger import estimate, prices, usage
from .serve import doctor, hash_key_command, init, models, render_default_config, serve
from .store import nodes, sessions

__all__ = ["main", "render_default_config"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="droidpool")
def main() -> None:
    """droidpool: an OpenAI-compatible server over a pool of warm Factory droid workers."""


for command in (serve, init, models, doctor, hash_key_command, sessions, usage, prices, estimate, nodes):
    main.add_command(command)
