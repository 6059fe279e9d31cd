"""`dppa prune`: prune a delta with one of the registered pruning methods (magnitude, DARE, Dynamic Pruning)."""

from dppa.cli import add_command
from dppa.cli.options import add_common, add_method_options, add_scope, add_storage, common_kwargs
from dppa.sparsify.prune import prune_delta
from dppa.sparsify.registry import PRUNERS

ORDER = 20
HELP = f"prune a delta ({', '.join(PRUNERS.names())})"

DESCRIPTION = """\
Prune a delta folder; pruned entries become exactly zero and the output has the same form as the input.
Only tensors matching --scope (the transformer blocks' linear projections) are pruned; the others keep their
delta, as in the DPPA reference.

methods:
{methods}

example:
  dppa prune data/deltas/math -o data/pruned/math-dp20 --method dp --density 0.2
"""


def register(subparsers) -> None:
    p = add_command(subparsers, "prune", HELP, DESCRIPTION.format(methods=PRUNERS.describe()), run)
    p.add_argument("delta", metavar="DELTA", help="delta folder written by `dppa extract`")
    add_common(p)
    p.add_argument("--method", required=True, choices=PRUNERS.names(), help="pruning method")
    p.add_argument("--density", required=True, type=float, metavar="D", help="share of delta entries kept, in (0, 1]")
    add_scope(p)
    add_method_options(p, PRUNERS)
    add_storage(p)


def run(args) -> int:
    out = prune_delta(
        args.delta,
        args.output,
        method=args.method,
        density=args.density,
        scope=args.scope,
        options=PRUNERS.options_from_args(args.method, args),
        storage=args.storage,
        **common_kwargs(args),
    )
    print(out)
    return 0
