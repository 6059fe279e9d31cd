"""Check a built zoo against the targets that make it resemble real fine-tuning (issue 9, item 1).

    python scripts/check_zoo.py ZOO --regime light|heavy [--scales 0.3,0.5,0.7,1.0] [--limit N]

Scores, on the test split (all 500 examples per task unless --limit), the base on every zoo task, each fine-tune on
its own task, and plain task arithmetic of all fine-tunes, base + scale * sum(ft - base), at each scale of a small
grid. Measures mean|ft - base| / mean|base| over the in-scope linear weights from the weights themselves. Prints a
table, and exits 1 when a target of the regime fails.

The targets were fixed before any pruning or DPPA result on the zoo was looked at; they describe real fine-tuning,
not what favours a method:
- every regime: the base scores <= 0.2 on every task; each fine-tune >= 0.8 on its own task;
- light: mean|delta| / mean|base| <= 0.05 for each fine-tune; task arithmetic at the best scale keeps on average
  >= 0.7 of each fine-tune's own score (merged / fine-tune per task, capped at 1, averaged over the fine-tunes);
- heavy: mean|delta| / mean|base| >= 0.2; task arithmetic keeps >= 0.3.

A real zoo (a pretrained base, `dppa zoo --size smollm2-135m`) has targets of its own (issue 20), set from published
real fine-tunes rather than from the small zoo, and counts gain over the base (a real base does not score 0):
- every regime: each fine-tune >= 0.3 exact match above the base on its own task;
- light: mean|delta| / mean|base| <= 0.01 (the DARE authors report DARE holding up to about 0.005); task
  arithmetic at its best scale keeps >= 0.5 of each fine-tune's gain over the base ((merged - base) / (fine-tune -
  base), capped at 1, averaged over the fine-tunes);
- heavy: mean|delta| / mean|base| >= 0.03 (where DARE starts to degrade); task arithmetic keeps >= 0.2 of the gain.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dppa.evaluation.objective import gain_kept, ratio

SCALES = (0.3, 0.5, 0.7, 1.0)


@dataclass(frozen=True)
class Targets:
    base_max: float | None = 0.2
    finetune_min: float | None = 0.8
    gain_min: float | None = None  # each fine-tune's own score minus the base's there
    delta_max: float | None = None  # relative delta of each fine-tune (linear weights)
    delta_min: float | None = None
    retention_min: float = 0.0  # mean over fine-tunes of merged score / fine-tune's score, at the best scale
    gain_retention: bool = False  # retention of the gain over the base instead of the score


TARGETS = {
    "light": Targets(delta_max=0.05, retention_min=0.7),
    "heavy": Targets(delta_min=0.2, retention_min=0.3),
}
REAL_TARGETS = {
    "light": Targets(base_max=None, finetune_min=None, gain_min=0.3, delta_max=0.01, retention_min=0.5,
                     gain_retention=True),
    "heavy": Targets(base_max=None, finetune_min=None, gain_min=0.3, delta_min=0.03, retention_min=0.2,
                     gain_retention=True),
}  # fmt: skip


def targets_for(size: str, regime: str) -> Targets:
    from dppa.zoo.pretrained import PRETRAINED

    return (REAL_TARGETS if size in PRETRAINED else TARGETS)[regime]


def retention(merged: dict[str, float], finetuned: dict[str, float], base: dict[str, float] | None = None) -> float:
    """Mean over tasks of merged score / the fine-tune's own score, each ratio capped at 1 (a merge that beats one
    fine-tune cannot make up for losing another's skill); a fine-tune scoring 0 counts as nothing kept.

    With `base`, the share of the gain kept instead: (merged - base) / (fine-tune - base), capped at 1 (and at 0
    from below: a merge worse than the base keeps nothing); a fine-tune no better than the base counts as nothing.
    """

    def kept(t: str) -> float:
        share = ratio(merged[t], finetuned[t]) if base is None else gain_kept(merged[t], finetuned[t], base[t])
        return 0.0 if share is None else max(0.0, min(1.0, share))

    return sum(kept(t) for t in finetuned) / len(finetuned)


def judge(result: dict, targets: Targets) -> list[str]:
    """The failed targets, as sentences; empty when the zoo meets them all."""
    failures = model_failures(result["base"], result["finetunes"], targets)
    best = result["best"]
    kept = "of the gain" if targets.gain_retention else ""
    if best["retention"] < targets.retention_min:
        failures.append(
            f"task arithmetic keeps {best['retention']:.3f}{' ' + kept if kept else ''} at its best scale "
            f"{best['scale']} (target >= {targets.retention_min})"
        )
    return failures


def model_failures(base: dict[str, float], finetunes: dict[str, dict], targets: Targets) -> list[str]:
    """The failed targets of the models themselves, those that need no merge, as sentences: `base` is {task: exact
    match}, `finetunes` zoo.json's domain entries (the numbers the zoo build records)."""
    failures = []
    for task, score in base.items():
        if targets.base_max is not None and score > targets.base_max:
            failures.append(f"base scores {score:.3f} on {task} (target <= {targets.base_max})")
    for domain, entry in finetunes.items():
        if targets.finetune_min is not None and entry["exact_match"] < targets.finetune_min:
            failures.append(
                f"{domain} scores {entry['exact_match']:.3f} on {entry['task']} (target >= {targets.finetune_min})"
            )
        gain = entry["exact_match"] - entry["base_exact_match"]
        if targets.gain_min is not None and gain < targets.gain_min:
            failures.append(
                f"{domain} gains {gain:.3f} over the base on {entry['task']} (target >= {targets.gain_min})"
            )
        rel = entry["relative_delta_linear"]
        if targets.delta_max is not None and rel > targets.delta_max:
            failures.append(f"{domain}: mean|delta|/mean|base| = {rel:.4f} (target <= {targets.delta_max})")
        if targets.delta_min is not None and rel < targets.delta_min:
            failures.append(f"{domain}: mean|delta|/mean|base| = {rel:.4f} (target >= {targets.delta_min})")
    return failures


def check_zoo(
    zoo: Path, *, scales=SCALES, limit: int | None = None, batch_size: int = 64, gain: bool = False, log=print
) -> dict:
    """Scores and deltas of a zoo and its task-arithmetic merges: the numbers `judge` compares with the targets.

    Fine-tunes may be model folders or LoRA adapters of the base. Models are scored in float32 (bf16 products are
    slow on CPU) with their weights as saved: a merge is rounded to the base's dtype first, as a merged folder is.
    `gain`: retention counts the gain over the base (real zoos)."""
    from dppa.evaluation.harness import evaluate_model, load_model
    from dppa.zoo.build import LINEAR_SCOPE, read_manifest, relative_delta
    from dppa.zoo.tasks import task_name

    domains = list(read_manifest(zoo)["domains"])
    tasks = {d: task_name(d) for d in domains}

    def scores(model, tok, names):
        metrics = evaluate_model(model, tok, names, split="test", limit=limit, batch_size=batch_size)
        return {t: metrics[t]["exact_match"] for t in names}

    started = time.perf_counter()
    base, tok = load_model(zoo / "base", device="cpu", upcast=False)
    saved_dtype = base.dtype
    base = base.float()
    base_state = {n: p.detach().clone().float() for n, p in base.state_dict().items()}
    result: dict = {"zoo": str(zoo), "limit": limit, "split": "test", "base": scores(base, tok, list(tasks.values()))}
    log(f"base: {result['base']}")
    result["finetunes"] = {}
    delta_sum = {n: torch.zeros_like(p) for n, p in base_state.items()}
    for domain in domains:
        ft, _ = load_model(zoo / domain, device="cpu", base=zoo / "base")
        ft = ft.float()
        own = scores(ft, tok, [tasks[domain]])[tasks[domain]]
        entry = {
            "task": tasks[domain],
            "exact_match": own,
            "base_exact_match": result["base"][tasks[domain]],
            "relative_delta_linear": relative_delta(base, ft, LINEAR_SCOPE),
        }
        result["finetunes"][domain] = entry
        log(f"{domain}: {entry}")
        for name, value in ft.state_dict().items():
            delta_sum[name] += value.float() - base_state[name]
        del ft
    finetuned = {tasks[d]: e["exact_match"] for d, e in result["finetunes"].items()}
    result["merges"] = []
    for scale in scales:
        merged_state = {n: (base_state[n] + scale * delta_sum[n]).to(saved_dtype).float() for n in base_state}
        base.load_state_dict(merged_state)
        merged = scores(base, tok, list(tasks.values()))
        row = {
            "scale": scale,
            "scores": merged,
            "retention": retention(merged, finetuned, result["base"] if gain else None),
        }
        result["merges"].append(row)
        log(f"task arithmetic x{scale}: {merged} retention {row['retention']:.3f}")
    base.load_state_dict({n: p for n, p in base_state.items()})
    result["best"] = max(result["merges"], key=lambda r: r["retention"])
    result["seconds"] = time.perf_counter() - started
    return result


def markdown(result: dict, regime: str) -> str:
    tasks = list(result["base"])
    lines = [
        f"Zoo {result['zoo']} ({regime}); exact match on the {result['split']} split"
        + (f", first {result['limit']} examples per task" if result["limit"] else ", all examples")
        + ":",
        "",
        "| model | " + " | ".join(tasks) + " | mean\\|delta\\|/mean\\|base\\| (linear) |",
        "|---" * (len(tasks) + 2) + "|",
        "| base | " + " | ".join(f"{result['base'][t]:.3f}" for t in tasks) + " | |",
    ]
    for domain, entry in result["finetunes"].items():
        cells = [f"{entry['exact_match']:.3f}" if t == entry["task"] else "" for t in tasks]
        lines.append(f"| {domain} | " + " | ".join(cells) + f" | {entry['relative_delta_linear']:.4f} |")
    for row in result["merges"]:
        mark = " (best)" if row == result["best"] else ""
        lines.append(
            f"| TA x{row['scale']}{mark} | "
            + " | ".join(f"{row['scores'][t]:.3f}" for t in tasks)
            + f" | retention {row['retention']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="check_zoo.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("zoo", type=Path, help="zoo folder built by `dppa zoo`")
    parser.add_argument("--regime", choices=sorted(TARGETS), default=None,
                        help="targets to check (default: the regime recorded in zoo.json)")  # fmt: skip
    parser.add_argument("--scales", default=",".join(map(str, SCALES)), help="task-arithmetic scales to try")
    parser.add_argument("--limit", type=int, default=None, help="first N test examples per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    torch.set_num_threads(1)  # a shared machine; these models gain little from more
    from dppa.zoo.build import read_manifest

    manifest = read_manifest(args.zoo)
    regime = args.regime or manifest["regime"]["name"]
    targets = targets_for(manifest["size"], regime)
    scales = [float(s) for s in args.scales.split(",")]
    result = check_zoo(
        args.zoo, scales=scales, limit=args.limit, batch_size=args.batch_size, gain=targets.gain_retention,
        log=lambda _m: None,
    )  # fmt: skip
    failures = judge(result, targets)
    result["regime"], result["failures"] = regime, failures
    print(markdown(result, regime))
    print(f"\nchecked in {result['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if failures:
        print(f"\n{len(failures)} target(s) of the {regime} regime missed:", file=sys.stderr)
        for failure in failures:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    print(f"every target of the {regime} regime met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
