"""`dppa stage NAME [--model M]`: run one pipeline stage (the command each dvc.yaml stage runs)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dppa.errors import DppaError

ORDER = 60
STAGE_NAMES = ("zoo", "fetch", "extract", "prune", "amplify", "merge", "evaluate", "report")
PER_MODEL = ("fetch", "extract", "prune", "amplify")

DESCRIPTION = """\
Run one stage of the pipeline as a Prefect flow, reading params.yaml (checked first) and writing its artifact
under data/. This is what each stage in dvc.yaml runs; normally you run `dvc repro` (only stale stages) or
`dppa run` (the whole pipeline through Prefect) instead of calling it yourself.

stages (per fine-tune ones take --model):
  zoo                     build the demo models           -> data/models/zoo
  fetch    --model NAME   hub snapshot / model record     -> data/models/fetched/NAME  (NAME may be base)
  extract  --model NAME   delta = fine-tune - base        -> data/deltas/NAME
  prune    --model NAME   prune.method at its density     -> data/pruned/NAME
  amplify  --model NAME   DP bands x factors (searched)   -> data/amplified/NAME, data/plots/search/NAME.csv
  merge                   merge every fine-tune's input   -> data/merged/model
  evaluate                base, fine-tunes, merged (test) -> data/metrics/scores.json
  report                  tables and plots                -> data/report/, data/metrics/summary.json

examples:
  dppa stage extract --model arith
  dvc repro amplify@arith        # the same, through DVC, with its upstream stages when stale
"""


def run(args: argparse.Namespace) -> int:
    from dppa.pipeline.config import load_params

    params_path = Path(args.params)
    params = load_params(params_path)  # before any work: a bad key fails here, naming it
    if args.name in PER_MODEL and not args.model:
        raise DppaError(f"stage {args.name} runs per model: pass --model NAME")
    if args.model and args.name not in PER_MODEL:
        raise DppaError(f"stage {args.name} covers every model: drop --model")
    if args.model and not (args.name == "fetch" and args.model == "base"):
        params.finetune(args.model)  # names the valid fine-tunes when it is not one
    root = params_path.resolve().parent

    from flows.runtime import set_gpu_limit
    from flows.stages import STAGES

    if not os.environ.get("PREFECT_API_URL"):
        # Run alone (e.g. by `dvc repro`): Prefect starts its embedded server for this process; under `dppa run`
        # the pipeline's API (and its GPU limit) is inherited through PREFECT_API_URL.
        set_gpu_limit(params.runtime.gpu_concurrency)
    kwargs = {"model": args.model} if args.name in PER_MODEL else {}
    STAGES[args.name](params, root, **kwargs)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "stage",
        help="run one pipeline stage (what dvc.yaml's stages run)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=STAGE_NAMES, help="stage to run")
    parser.add_argument("--model", help="fine-tune name (per-model stages; `base` for fetch)")
    parser.add_argument("--params", default="params.yaml", help="params file; its folder is the project root")
    parser.set_defaults(func=run)
