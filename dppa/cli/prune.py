"""`dppa prune`: magnitude, DARE or Dynamic Pruning of a delta."""

import argparse

from dppa.cli.options import add_common, add_dp_options, common_kwargs, dp_kwargs
from dppa.sparsify.prune import METHODS, prune_delta

ORDER = 20

DESCRIPTION = """\
Prune a delta folder; pruned entries become exactly zero and the output has the same form as the input.
Only tensors matching --scope (the transformer blocks' linear projections) are pruned; the others keep their
delta, as in the DPPA reference.

methods:
  magnitude  keep the round(D * n) largest |delta| of each tensor
  dare       drop each entry with probability 1 - D, rescale survivors by 1 / D (seeded; identical bit for bit)
  dp         Dynamic Pruning: magnitude pruning with per-layer and per-module densities adjusted by how
             outlier-heavy each is; the chosen densities are written to the manifest

example:
  dppa prune data/deltas/math -o data/pruned/math-dp20 --method dp --density 0.2
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("prune", help="prune a delta (magnitude, dare, dp)", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("delta", metavar="DELTA", help="delta folder written by `dppa extract`")
    add_common(p)
    p.add_argument("--method", required=True, choices=METHODS, help="pruning method")
    p.add_argument("--density", required=True, type=float, metavar="D", help="share of delta entries kept, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="DARE's random seed (default 0)")
    add_dp_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    out = prune_delta(args.delta, args.output, method=args.method, density=args.density, seed=args.seed,
                      **dp_kwargs(args), **common_kwargs(args))
    print(out)
    return 0
