"""`dppa amplify`: Dynamic Partition Amplification of a delta."""

import argparse

from dppa.cli.options import add_common, add_dp_options, common_kwargs, float_list
from dppa.registry import options_from_args
from dppa.sparsify.bands import COMBINE_RULES, amplify_delta
from dppa.sparsify.dp import DPOptions

ORDER = 30

DESCRIPTION = """\
Split the entries Dynamic Pruning keeps into significance bands and amplify each band by its own factor.
With --densities 0.1,0.2: band 1 = entries DP keeps at density 0.1, band 2 = entries kept at 0.2 but not 0.1.
Under the reference's combination rule (--combine max, default) band b is scaled by max(alpha_b..alpha_K);
tensors outside --scope are scaled by max(alpha). The output is a sparse delta of density max(densities).

example (the paper's setting, factors found by a search):
  dppa amplify data/deltas/math -o data/amplified/math --densities 0.1,0.2 --factors 1.8,1.0
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "amplify",
        help="DPA: amplify DP bands of a delta by per-band factors",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("delta", metavar="DELTA", help="delta folder written by `dppa extract` (unpruned)")
    add_common(p)
    p.add_argument(
        "--densities",
        type=float_list,
        default=[0.1, 0.2],
        metavar="D1,D2,..",
        help="increasing band densities (default 0.1,0.2)",
    )
    p.add_argument("--factors", type=float_list, required=True, metavar="A1,A2,..", help="one factor per band")
    p.add_argument(
        "--combine",
        choices=COMBINE_RULES,
        default="max",
        help="max: reference rule, band b gets max(alpha_b..alpha_K); band: band b gets alpha_b",
    )
    add_dp_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    out = amplify_delta(
        args.delta,
        args.output,
        densities=args.densities,
        factors=args.factors,
        combine=args.combine,
        options=options_from_args(DPOptions, args),
        scope=args.scope,
        **common_kwargs(args),
    )
    print(out)
    return 0
