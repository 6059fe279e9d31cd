"""Micro-benchmark of magnitude-threshold selection: the k-th largest |delta| of a tensor, k = density * n.

    python bench/threshold.py                       # LLaMA-7B-like and 1B-like tensor sizes, density 0.2
    python bench/threshold.py --sizes 4096x4096 --density 0.1 --repeats 5

Compared, on the same heavy-tailed float32 values:
  torch.sort      full descending sort, then index k-1 (what the reference and mergekit do: O(n log n))
  torch.topk      k largest values (a partial sort)
  torch.kthvalue  exact selection, O(n)
  dppa            dppa.select.kth_largest: a sampled bracket, one counting pass, kthvalue inside the bracket
All must return the same value; the script says so, or stops.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from dppa.select import kth_largest  # noqa: E402


def by_sort(v: torch.Tensor, k: int) -> float:
    return float(torch.sort(v, descending=True).values[k - 1])


def by_topk(v: torch.Tensor, k: int) -> float:
    return float(torch.topk(v, k, sorted=False).values.min())


def by_kthvalue(v: torch.Tensor, k: int) -> float:
    return float(torch.kthvalue(v, v.numel() - k + 1).values)


def by_dppa(v: torch.Tensor, k: int) -> float:
    return float(kth_largest(v, k))


METHODS = {"torch.sort": by_sort, "torch.topk": by_topk, "torch.kthvalue": by_kthvalue, "dppa": by_dppa}


def heavy_tailed(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * torch.randn(n, generator=g).mul_(0.8).exp_()).abs_()


def parse_size(text: str) -> int:
    n = 1
    for part in text.lower().split("x"):
        n *= int(part)
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2048x2048,5632x2048,4096x4096,11008x4096,32000x4096",
                   help="comma-separated tensor shapes")
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS), help="subset of " + ",".join(METHODS))
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, density {args.density}, "
          f"median of {args.repeats}")
    print(f"{'shape':>12} {'elements':>11} " + " ".join(f"{m + ' s':>16}" for m in methods) + "  sort/dppa")
    for shape in args.sizes.split(","):
        n = parse_size(shape)
        values = heavy_tailed(n, seed=n)
        k = max(1, int(args.density * n))
        times, answers = {}, {}
        for m in methods:
            samples = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                answers[m] = METHODS[m](values, k)
                samples.append(time.perf_counter() - start)
            times[m] = statistics.median(samples)
        if len(set(answers.values())) != 1:
            raise SystemExit(f"{shape}: methods disagree on the threshold: {answers}")
        ratio = f"{times['torch.sort'] / times['dppa']:9.1f}" if {"torch.sort", "dppa"} <= set(times) else ""
        print(f"{shape:>12} {n:11d} " + " ".join(f"{times[m]:16.3f}" for m in methods) + f"  {ratio}", flush=True)
    print("all methods returned the same threshold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
