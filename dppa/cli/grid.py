"""`dppa grid GRID_FILE`: experiments as parameter grids over the pipeline (dppa/pipeline/grid.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dppa.cli import add_command
from dppa.errors import DppaError

ORDER = 75
HELP = "run an experiment grid: each point one DVC experiment through the pipeline, tables over seeds"


def run(args: argparse.Namespace) -> int:
    from dppa.pipeline.grid import load_grid, parse_where, run_grid, write_tables

    spec = load_grid(Path(args.grid))
    grids = args.only or list(spec["grids"])
    unknown = set(grids) - set(spec["grids"])
    if unknown:
        raise DppaError(f"--only {sorted(unknown)[0]}: not a grid of {args.grid} ({', '.join(spec['grids'])})")
    projects = [Path(p).resolve() for p in args.project or ["."]]
    where = parse_where(args.where)
    if args.tables_only:
        path = write_tables(spec, grids, projects, Path(args.results))
    elif len(projects) > 1:
        raise DppaError("give one --project to run a grid (several only with --tables-only)")
    else:
        project = projects[0]
        path = run_grid(
            spec,
            grids,
            project,
            Path(args.results),
            where,
            log=lambda message: print(message, flush=True),
        )
    print(path.read_text())
    return 0


def register(subparsers) -> None:
    from dppa.pipeline import grid

    parser = add_command(subparsers, "grid", HELP, grid.__doc__, run)
    parser.add_argument("grid", help="grid file, e.g. experiments/paper.yaml")
    parser.add_argument(
        "-C",
        "--project",
        action="append",
        help="the project (a git + DVC repository; default .); with --tables-only repeatable: tables from all",
    )
    parser.add_argument("--only", action="append", help="run only this grid (repeatable, in this order)")
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run only the points whose override of KEY is VALUE (read as YAML; repeatable)",
    )
    parser.add_argument("--results", default="experiments/results", help="tables folder (default experiments/results)")
    parser.add_argument("--tables-only", action="store_true", help="write the tables from what is recorded")
