"""Subcommands of the `dppa` CLI, one module each (see dppa/cli.py)."""
