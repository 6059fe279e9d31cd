"""The `dppa` command. Each subcommand lives in its own module under `dppa/cli/`.

A command module defines `register(subparsers)` which adds its parser and sets `func` to a callable taking the
parsed arguments. Modules are discovered, so adding a command means adding one file; `ORDER` sorts them in `--help`.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from dppa import __version__
from dppa.errors import DppaError

EPILOG = """\
typical use:
  dppa fetch org/model --revision main -o models/math       # from the hub: safetensors only, commit recorded
  dppa extract BASE FINETUNED -o data/deltas/math          # delta = finetuned - base, streamed
  dppa prune data/deltas/math -o data/pruned/math --method dp --density 0.2
  dppa amplify data/deltas/math -o data/amplified/math --densities 0.1,0.2 --factors 1.8,1.0
  dppa merge BASE data/amplified/* -o data/merged/model --method ties
Run `dppa COMMAND --help` for the options of each command.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dppa",
        description="Merge fine-tuned LLMs with DPPA: delta extraction, Dynamic Pruning, "
        "Dynamic Partition Amplification, TIES / task-arithmetic merging, evaluation.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dppa {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    import dppa.cli as commands_pkg

    modules = [importlib.import_module(f"dppa.cli.{m.name}") for m in pkgutil.iter_modules(commands_pkg.__path__)]
    for module in sorted(modules, key=lambda m: (getattr(m, "ORDER", 100), m.__name__)):
        if hasattr(module, "register"):
            module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except DppaError as exc:
        print(f"dppa {args.command}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)  # 2: bad input; a run that failed part-way says otherwise
    except KeyboardInterrupt:
        print(f"dppa {args.command}: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
