"""Score every model of a zoo on every zoo task and print the Markdown tables the README shows.

    python -m dppa.zoo.report data/zoo --light data/zoo-light [--split test] [--limit N]

Rows: the base and each fine-tune; columns: the zoo tasks (exact match, in points). A second table gives each
fine-tune's margin over the base on its own task, and its mean|delta| / mean|base weight| (heavy zoo, and the
light zoo when given, with the ratio between the two).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dppa.evaluation.harness import evaluate_folder
from dppa.zoo.build import read_manifest
from dppa.zoo.tasks import task_name


def score_table(zoo: Path, split: str, limit: int | None, batch_size: int) -> dict[str, dict[str, float]]:
    """{model: {task: exact match}} for the base and every fine-tune of the zoo."""
    domains = list(read_manifest(zoo)["domains"])
    tasks = [task_name(d) for d in domains]
    table = {}
    for model in ["base", *domains]:
        metrics = evaluate_folder(zoo / model, tasks, split=split, limit=limit, batch_size=batch_size, device="cpu")
        table[model] = {task: metrics[task]["exact_match"] for task in tasks}
    return table


def markdown_scores(table: dict[str, dict[str, float]]) -> str:
    tasks = list(next(iter(table.values())))
    lines = ["| model | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for model, scores in table.items():
        lines.append(f"| {model} | " + " | ".join(f"{100 * scores[t]:.1f}" for t in tasks) + " |")
    return "\n".join(lines)


def markdown_deltas(table: dict[str, dict[str, float]], zoo: dict, light: dict | None) -> str:
    columns = ["fine-tune", "own task", "margin over base (points)", "mean\\|delta\\|/mean\\|base\\|"]
    if light:
        columns += ["same, light regime", "ratio"]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for domain, stats in zoo["domains"].items():
        task = stats["task"]
        margin = 100 * (table[domain][task] - table["base"][task])
        row = f"| {domain} | {task} | {margin:+.1f} | {stats['relative_delta']:.4f} |"
        if light:
            small = light["domains"][domain]["relative_delta"]
            row += f" {small:.4f} | {stats['relative_delta'] / small:.1f}x |"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dppa.zoo.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("zoo", type=Path, help="zoo folder built by `dppa zoo` (the heavy regime)")
    parser.add_argument("--light", type=Path, default=None, help="a light-regime zoo, to compare delta sizes")
    parser.add_argument("--split", default="test", choices=["validation", "test"])
    parser.add_argument("--limit", type=int, default=None, help="first N examples of each task only")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    table = score_table(args.zoo, args.split, args.limit, args.batch_size)
    print(f"Exact match (%) on the {args.split} split:\n")
    print(markdown_scores(table))
    print()
    print(markdown_deltas(table, read_manifest(args.zoo), read_manifest(args.light) if args.light else None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
