"""Peak RSS of `dppa extract`, `dppa prune --method dp` and `dppa merge --method ties` against the memory budget.

    python bench/memory.py --params 1B --dtype bf16          # makes bench/out/syn-1B-bf16-s0 (3 x 2.1 GB) once
    python bench/memory.py --checkpoint DIR                  # DIR holds base/, ft1/, ft2/

Budget (issue 2): 1 GiB + 4 x the largest tensor of the model in float32, whatever the model size. Every step runs
under /usr/bin/time -v and its "Maximum resident set size" is compared with the budget. Steps, in order:
  extract ft1, extract ft2      dppa extract BASE FTi -o Di
  prune dp                      dppa prune D1 -o P1 --method dp --density 0.2
  merge ties                    dppa merge BASE D1 D2 -o M --method ties --density 0.2   (trim on, two fine-tunes)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

from runner import BENCH, DPPA, REPO, bench_env, ensure_checkpoint, measure, snapshot, source_label
from safetensors import safe_open

GIB = 1 << 30
MIB = 1 << 20


def largest_tensor_numel(model: Path) -> tuple[str, int]:
    """Largest tensor of a model folder, from the safetensors headers only."""
    best = ("", 0)
    for f in sorted(model.glob("*.safetensors")):
        with safe_open(str(f), "pt") as handle:
            for name in handle.keys():
                n = math.prod(handle.get_slice(name).get_shape())
                if n > best[1]:
                    best = (name, n)
    return best


def steps(ckpt: Path, work: Path, density: float) -> list[tuple[str, list[str]]]:
    base, d1, d2 = ckpt / "base", work / "d1", work / "d2"
    return [
        ("extract ft1", DPPA + ["extract", str(base), str(ckpt / "ft1"), "-o", str(d1)]),
        ("extract ft2", DPPA + ["extract", str(base), str(ckpt / "ft2"), "-o", str(d2)]),
        ("prune dp", DPPA + ["prune", str(d1), "-o", str(work / "p1"), "--method", "dp", "--density", str(density)]),
        (
            "merge ties",
            DPPA
            + [
                "merge",
                str(base),
                str(d1),
                str(d2),
                "-o",
                str(work / "merged"),
                "--method",
                "ties",
                "--density",
                str(density),
            ],
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="1B", help="make_synthetic.py preset")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", type=Path, help="folder with base/, ft1/, ft2/ instead of a generated one")
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--threads", type=int, help="OMP/MKL threads (default: torch's own, all cores)")
    p.add_argument("--at", metavar="COMMIT", help="run dppa as of this commit (default: the working tree)")
    p.add_argument("--work", type=Path, default=BENCH / "out")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--keep", action="store_true", help="keep the deltas and outputs")
    args = p.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = (args.checkpoint or ensure_checkpoint(args.work, args.params, args.dtype, args.seed)).resolve()
    work = (args.work / f"mem-{ckpt.name}").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src = snapshot(args.at, args.work) if args.at else REPO
    env = bench_env(args.threads, src)
    name, numel = largest_tensor_numel(ckpt / "base")
    budget_mib = (GIB + 4 * 4 * numel) / MIB
    model_bytes = sum(f.stat().st_size for f in (ckpt / "base").glob("*.safetensors"))
    print(
        f"checkpoint {ckpt}: {model_bytes / 1e9:.2f} GB per model; largest tensor {name} ({numel} elements, "
        f"{4 * numel / MIB:.0f} MiB in float32); budget 1 GiB + 4 x that = {budget_mib:.0f} MiB; "
        f"dppa at {source_label(src)}, threads {args.threads or 'default'}"
    )
    print(f"{'step':12} {'wall s':>8} {'cpu s':>8} {'peak RSS MiB':>13} {'budget MiB':>11} {'load':>5}  verdict")
    figures = {}
    for label, cmd in steps(ckpt, work, args.density):
        run = measure(cmd, work / f"{label.replace(' ', '-')}.log", env)
        ok = run.peak_rss_mib <= budget_mib
        figures[label] = dict(vars(run), budget_mib=budget_mib, within=ok, command=" ".join(cmd))
        print(
            f"{label:12} {run.wall_s:8.1f} {run.cpu_s:8.1f} {run.peak_rss_mib:13.0f} {budget_mib:11.0f} "
            f"{run.load_avg:5.1f}  "
            f"{'within' if ok else 'OVER'}",
            flush=True,
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "checkpoint": str(ckpt),
                    "dppa_at": source_label(src),
                    "largest_tensor": name,
                    "numel": numel,
                    "threads": args.threads,
                    "steps": figures,
                },
                indent=2,
            )
        )
    if not args.keep:
        shutil.rmtree(work)
    return 0 if all(f["within"] for f in figures.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
