"""`dppa stage NAME --ARG VALUE ...`: run one pipeline stage (the command each dvc.yaml stage runs).

The paths are written once, in dvc.yaml, and passed here; each stage's options are its function's arguments
(dppa/stages), so this module names no path and no stage argument itself.
"""

from __future__ import annotations

import argparse
import inspect
import os
import time
from pathlib import Path

ORDER = 60

DESCRIPTION = """\
Run one stage of the pipeline, reading params.yaml (checked first) and writing the outputs it is
given. This is what each stage in dvc.yaml runs, with the paths dvc.yaml declares; normally you run `dvc repro`
(only stale stages) or `dppa run` (the whole pipeline through Prefect) instead of calling it yourself.

examples:
  dppa stage prune --help                   # the stage's arguments
  dvc repro prune@arith                     # the stage as dvc.yaml runs it, with its upstream stages when stale
"""


def stage_parser() -> argparse.ArgumentParser:
    """The parser of `dppa stage`, built from the stage functions (imported only when a stage runs)."""
    from dppa.stages import STAGES, stage_arguments

    parser = argparse.ArgumentParser(
        prog="dppa stage", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, stage in STAGES.items():
        doc = (inspect.getdoc(stage) or "").split("\n\n")[0].replace("\n", " ")
        sub = stages.add_parser(name, help=doc, description=doc)
        for arg in stage_arguments(stage):
            sub.add_argument(
                f"--{arg.name.replace('_', '-')}",
                dest=arg.name,
                required=True,
                metavar="NAME" if arg.name == "model" else "PATH",
            )
        sub.add_argument("--params", default="params.yaml", help="params file; its folder is the project root")
    return parser


def run(args: argparse.Namespace) -> int:
    from dppa.pipeline.lifeline import die_with_parent, terminated_as_interrupt
    from dppa.pipeline.run_lock import TOKEN_ENV
    from dppa.pipeline.stage_client import stage_command

    if os.environ.get(TOKEN_ENV):
        die_with_parent()  # started by a run (through `dvc repro`): end with it, even when it is killed
    status = stage_command(["stage", *args.argv])  # in a warm process, its imports done, when one is there
    if status is not None:
        return status
    from dppa.pipeline.config import BASE_NAME, load_params

    args = stage_parser().parse_args(args.argv)
    params_path = Path(args.params)
    params = load_params(params_path)  # before any work: a bad key fails here, naming it
    if getattr(args, "model", None) and not (args.stage == "fetch" and args.model == BASE_NAME):
        params.finetune(args.model)  # names the valid fine-tunes when it is not one
    root = params_path.resolve().parent

    from dppa.pipeline.run_lock import run_lock
    from dppa.stages import STAGES, stage_arguments

    stage = STAGES[args.stage]
    kwargs = {p.name: getattr(args, p.name) for p in stage_arguments(stage)}
    kwargs = {k: v if k == "model" else Path(v).resolve() for k, v in kwargs.items()}
    with run_lock(root, on_overlap=params.runtime.on_overlap or "fail", command=f"dppa stage {args.stage}"):
        started = time.perf_counter()
        with terminated_as_interrupt():  # a stopped stage removes its temporary output, as on Ctrl-C
            stage(params, root, **kwargs)
    # the stage's own time, apart from the interpreter, imports and DVC around it (bench/stage_overhead.py reads it)
    name = os.environ.get("DVC_STAGE", args.stage)
    # (on a line of its own: a progress bar on stderr may have left the terminal's line unfinished)
    print(f"\n{name}: the stage's own work took {time.perf_counter() - started:.2f} s", flush=True)
    return 0


def register(subparsers) -> None:
    # Every word after `stage` goes to stage_parser(), `--help` included: no prefix character is "-" here.
    parser = subparsers.add_parser(
        "stage", help="run one pipeline stage (what dvc.yaml's stages run)", add_help=False, prefix_chars="+"
    )
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="STAGE --ARG VALUE ...")
    parser.set_defaults(func=run)
