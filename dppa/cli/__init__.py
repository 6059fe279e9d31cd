"""The `dppa` command. Each subcommand lives in its own module under `dppa/cli/`.

A command module defines `register(subparsers)` which adds its parser and sets `func` to a callable taking the
parsed arguments. Modules are discovered, so adding a command means adding one file; `ORDER` sorts them in `--help`.
A command line naming a command imports that command's module only (`dppa merge` pays for merging, not for the
pipeline's, the hub's and the search's imports); `dppa --help` and unknown commands import them all.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from dppa import __version__
from dppa.errors import DEBUG_ENV, DppaError, debugging

EPILOG = """\
typical use:
  dppa fetch org/model --revision main -o models/math       # from the hub: safetensors only, commit recorded
  dppa extract BASE FINETUNED -o data/deltas/math          # delta = finetuned - base, streamed
  dppa prune data/deltas/math -o data/pruned/math --method dp --density 0.2
  dppa amplify data/deltas/math -o data/amplified/math --densities 0.1,0.2 --factors 1.8,1.0
  dppa merge BASE data/amplified/* -o data/merged/model --method ties
Run `dppa COMMAND --help` for the options of each command.
"""


def add_command(subparsers, name: str, help: str, description: str, run, **options) -> argparse.ArgumentParser:
    """A command's parser (its description printed as written) that calls `run(args)`."""
    parser = subparsers.add_parser(
        name, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter, **options
    )
    parser.set_defaults(func=run)
    return parser


def command_names() -> list[str]:
    import dppa.cli as commands_pkg

    return [m.name for m in pkgutil.iter_modules(commands_pkg.__path__) if m.name != "options"]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `dppa` parser; `only`: with just that command's subparser (its module alone imported)."""
    parser = argparse.ArgumentParser(
        prog="dppa",
        description="Merge fine-tuned LLMs with DPPA: delta extraction, Dynamic Pruning, "
        "Dynamic Partition Amplification, TIES / task-arithmetic merging, evaluation.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dppa {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the Python traceback of an error (for bug reports; also {DEBUG_ENV}=1); without it every "
        "error is one line",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = [only] if only else command_names()
    modules = [importlib.import_module(f"dppa.cli.{name}") for name in names]
    for module in sorted(modules, key=lambda m: (getattr(m, "ORDER", 100), m.__name__)):
        if hasattr(module, "register"):
            module.register(subparsers)
    return parser


def _command(argv: list[str]) -> str | None:
    """The command an argument list names, when it names a known one before any option (options of the top-level
    parser, such as --help, need every command)."""
    first = argv[0] if argv else None
    return first if first in command_names() else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] != ["--debug"]:  # before the command: the command's own parser alone is built
        return _main(argv, debug=debugging())
    saved = os.environ.get(DEBUG_ENV)
    os.environ[DEBUG_ENV] = "1"  # the stages a run starts show their tracebacks too
    try:
        return _main(argv[1:], debug=True)
    finally:  # main may be called in-process (tests, scripts): the flag ends with the command
        if saved is None:
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = saved


def _main(argv: list[str], debug: bool) -> int:
    parser = build_parser(only=_command(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print(f"dppa {args.command}: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        message, code = error_line(exc)
        print(f"dppa {args.command}: error: {' '.join(message.split())}", file=sys.stderr)  # one line, always
        return code
    return int(result or 0)


def error_line(exc: Exception) -> tuple[str, int]:
    """(one line for the user, exit code) for any error a command raises; tracebacks are for --debug."""
    if isinstance(exc, DppaError):
        return str(exc), getattr(exc, "exit_code", 2)  # 2: bad input; a run that failed part-way says otherwise
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}", 1
    first = (str(exc).strip().splitlines() or [""])[0]
    return (
        f"unexpected {type(exc).__name__}: {first} (a bug: rerun with --debug, or {DEBUG_ENV}=1, and report the "
        "traceback)",
        1,
    )


if __name__ == "__main__":
    sys.exit(main())
