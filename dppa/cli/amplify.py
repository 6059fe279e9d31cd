"""`dppa amplify`: Dynamic Partition Amplification of a delta."""

from dppa.cli import add_command
from dppa.cli.options import add_band_options, add_common, add_dp_options, add_storage, common_kwargs, float_list
from dppa.sparsify.bands import amplify_delta
from dppa.sparsify.registry import PRUNERS

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
    p = add_command(subparsers, "amplify", "DPA: amplify DP bands of a delta by per-band factors", DESCRIPTION, run)
    p.add_argument("delta", metavar="DELTA", help="delta folder written by `dppa extract` (unpruned)")
    add_common(p)
    add_band_options(p)
    p.add_argument("--factors", type=float_list, required=True, metavar="A1,A2,..", help="one factor per band")
    add_dp_options(p)
    add_storage(p)


def run(args) -> int:
    out = amplify_delta(
        args.delta,
        args.output,
        densities=args.densities,
        factors=args.factors,
        combine=args.combine,
        options=PRUNERS.options_from_args("dp", args),
        scope=args.scope,
        storage=args.storage,
        **common_kwargs(args),
    )
    print(out)
    return 0
