"""``python -m droidpool``: the command line."""

from droidpool.cli import main

main()
