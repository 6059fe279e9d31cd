"""`dppa eval MODEL --tasks T1,T2`: score a model folder with lm-evaluation-harness and write a metrics JSON."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dppa.cli import add_command

ORDER = 90

DESCRIPTION = """\
Evaluate a model folder (or a hub model name, where the hub is reachable) with lm-evaluation-harness, HF backend.
The zoo's tasks zoo_arith, zoo_facts, zoo_strings (and tag `zoo`) are always available, offline; any harness task
name works too (e.g. gsm8k, hellaswag on machines that reach the hub); more local task folders can be listed in
DPPA_TASK_PATH. Zoo tasks are greedy generation up to a newline, scored by exact match.

The metrics JSON maps task -> metric -> value, e.g. {"zoo_arith": {"exact_match": 0.93}}; the harness's full
results go beside it (metrics.json -> metrics.harness.json). Without --output the metrics are printed.

examples:
  dppa eval data/zoo/arith --tasks zoo_arith,zoo_facts --split test --output metrics.json
  dppa eval data/merged/model --tasks zoo --limit 100          # all zoo tasks, first 100 examples each
"""


def _write_json(path: Path, data: dict) -> None:
    from lm_eval.utils import handle_non_serializable

    from dppa.io.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=handle_non_serializable) + "\n")


def run(args: argparse.Namespace) -> int:
    from dppa.errors import DppaError
    from dppa.evaluation.harness import evaluate_folder, metrics_from_results, parse_task_list

    if not args.verbose:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    results = evaluate_folder(
        args.model, parse_task_list(args.tasks), split=args.split, limit=args.limit, batch_size=args.batch_size,
        device=args.device, full_results=True,
    )  # fmt: skip
    metrics = metrics_from_results(results)
    if args.output:
        out = Path(args.output)
        full = out.with_suffix(".harness.json")
        for path in (out, full):  # check both before writing either
            if path.exists() and not args.overwrite:
                raise DppaError(f"{path}: already exists; choose another --output or pass --overwrite")
        _write_json(full, {k: v for k, v in results.items() if k != "samples"})
        _write_json(out, metrics)
    json.dump(metrics, sys.stdout, indent=2, sort_keys=True)
    print()
    return 0


def register(subparsers) -> None:
    parser = add_command(subparsers, "eval", "evaluate a model folder with lm-evaluation-harness", DESCRIPTION, run)
    parser.add_argument("model", help="model folder (HF format) or hub model name")
    parser.add_argument("--tasks", required=True, help="comma-separated task names, e.g. zoo_arith,zoo_facts")
    parser.add_argument(
        "--split", default="test", choices=["validation", "test"], help="split to score (default: test)"
    )
    parser.add_argument("--limit", type=int, default=None, help="first N examples of each task only")
    parser.add_argument("--batch-size", type=int, default=32, help="generation batch size (default: 32)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda:0 (default: cuda if available)")
    parser.add_argument("--output", default=None, help="metrics JSON file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--verbose", action="store_true", help="show the harness's log")
