"""Micro-benchmark of magnitude-threshold selection: the k-th largest |delta| of a tensor, k = density * n.

    python bench/threshold.py                       # 1B- and 7B-like tensor shapes, float32 and bf16, density 0.2
    python bench/threshold.py --sizes 4096x4096 --dtypes bf16 --density 0.1 --repeats 5

Each method gets the signed delta tensor in its stored dtype and returns the threshold magnitude:
  torch.sort      |delta| in float32, full descending sort, element k-1 (what mergekit does: O(n log n))
  torch.topk      |delta| in float32, the k largest (a partial sort)
  torch.kthvalue  |delta| in float32, exact selection, O(n)
  dppa            dppa.sparsify.threshold: integer keys from the bit patterns, radix selection by bincount histograms
                  (one pass for 16-bit dtypes, two for float32), then the tie cutoff
All must return the same value; the script says so, or stops. Times are CPU seconds of this process (all threads),
which other work on the machine disturbs less than wall time; threads: torch's default (set OMP_NUM_THREADS).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dppa.sparsify.threshold import find_threshold, key_bits, magnitude_keys  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KEY_DTYPE = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def by_sort(v: torch.Tensor, k: int) -> float:
    return float(torch.sort(v.abs().float(), descending=True).values[k - 1])


def by_topk(v: torch.Tensor, k: int) -> float:
    return float(torch.topk(v.abs().float(), k, sorted=False).values.min())


def by_kthvalue(v: torch.Tensor, k: int) -> float:
    return float(torch.kthvalue(v.abs().float(), v.numel() - k + 1).values)


def by_dppa(v: torch.Tensor, k: int) -> float:
    keys = magnitude_keys(v)
    threshold = find_threshold(lambda: [keys], keys.numel(), k, key_bits(v.dtype))
    return float(torch.tensor([threshold.key], dtype=KEY_DTYPE[v.dtype]).view(v.dtype))


METHODS = {"torch.sort": by_sort, "torch.topk": by_topk, "torch.kthvalue": by_kthvalue, "dppa": by_dppa}


def heavy_tailed(n: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Signed deltas shaped like fine-tuning deltas: a Gaussian scale mixture, ~1e-3 in size."""
    g = torch.Generator().manual_seed(seed)
    return (1e-3 * torch.randn(n, generator=g) * torch.randn(n, generator=g).mul_(0.8).exp_()).to(dtype)


def parse_size(text: str) -> int:
    n = 1
    for part in text.lower().split("x"):
        n *= int(part)
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2048x2048,5632x2048,11008x4096,32000x2048", help="comma-separated tensor shapes")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated, of " + ",".join(DTYPES))
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS), help="subset of " + ",".join(METHODS))
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, density {args.density}, "
        f"median of {args.repeats} (CPU seconds)"
    )
    print(f"{'dtype':>5} {'shape':>11} {'elements':>10} " + " ".join(f"{m:>14}" for m in methods) + "  sort/dppa")
    for dtype_name in args.dtypes.split(","):
        for shape in args.sizes.split(","):
            n = parse_size(shape)
            values = heavy_tailed(n, seed=n, dtype=DTYPES[dtype_name])
            k = max(1, int(args.density * n))
            times, answers = {}, {}
            for m in methods:
                samples = []
                for _ in range(args.repeats):
                    start = time.process_time()
                    answers[m] = METHODS[m](values, k)
                    samples.append(time.process_time() - start)
                times[m] = statistics.median(samples)
            if len(set(answers.values())) != 1:
                raise SystemExit(f"{dtype_name} {shape}: methods disagree on the threshold: {answers}")
            ratio = f"{times['torch.sort'] / times['dppa']:9.1f}" if {"torch.sort", "dppa"} <= set(times) else ""
            print(
                f"{dtype_name:>5} {shape:>11} {n:10d} " + " ".join(f"{times[m]:14.3f}" for m in methods) + f"  {ratio}",
                flush=True,
            )
    print("all methods returned the same threshold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
