"""``python -m droidpool``: the command line."""

from .cli import main

main()
