"""`dppa search`: find DPPA's band factors for one fine-tune on the validation split, write the amplified delta."""

import argparse
import sys

from dppa.cli import add_command
from dppa.cli.options import add_band_options, add_dp_options
from dppa.errors import DppaError
from dppa.registry import add_options, options_of
from dppa.sparsify.registry import PRUNERS

ORDER = 35
HELP = "search DPPA's band factors on validation, write the amplified delta"

DESCRIPTION = """\
Search the per-band amplification factors of one fine-tune's delta (docs/method.md), then write the amplified delta
with the chosen factors, exactly as `dppa amplify --factors ...` would, with the search recorded in its manifest.

Each candidate (base + amplified delta) is built in memory from the DP bands and scored with lm-eval on the
VALIDATION split; the objective is the geometric mean over --tasks of candidate score / dense fine-tune score.
Every score is cached (--cache), keyed by the delta and base content hashes, factors, tasks, split, limit, harness
version and band recipe: rerunning the same search evaluates nothing again.

Strategies (--strategy):
{strategies}
The coordinate walk's budget never stops it before every band's factor was probed once (--no-probe-every-band
makes the budget a hard stop).
OUT gets search_trace.json (every candidate, scores, build vs evaluate time) and search_trace.csv (for a plot);
--trace FILE.csv writes them elsewhere too (FILE.json beside it).

example (demo zoo):
  dppa extract data/zoo/base data/zoo/arith -o data/deltas/arith
  dppa search data/zoo/base data/deltas/arith -o data/amplified/arith --tasks zoo_arith \\
      --dense data/zoo/arith --limit 100
"""


def register(subparsers) -> None:
    from dppa.search.registry import ALIASES, DEFAULT_STRATEGY, STRATEGIES

    p = add_command(subparsers, "search", HELP, DESCRIPTION.format(strategies=STRATEGIES.describe()), run)
    p.add_argument("base", metavar="BASE", help="base model folder (the delta's base)")
    p.add_argument("delta", metavar="DELTA", help="unpruned delta folder written by `dppa extract`")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="amplified delta folder to write (atomic)")
    p.add_argument("--tasks", required=True, metavar="T1,T2", help="the fine-tune's own lm-eval tasks, e.g. zoo_arith")
    p.add_argument(
        "--dense",
        metavar="FT_OR_JSON",
        help="the dense fine-tune's model folder (evaluated once, cached), or a JSON of its scores on "
        "the same split and limit ({task: {metric: value}}, as `dppa eval --output` writes)",
    )
    # the flag's old name, before "reference" came to mean the authors' code only; hidden, still accepted
    p.add_argument("--reference", dest="dense_old_flag", metavar="FT_OR_JSON", help=argparse.SUPPRESS)
    p.add_argument(
        "--strategy",
        default=DEFAULT_STRATEGY,
        choices=[*STRATEGIES.names(), *ALIASES],
        help=f"search strategy (default {DEFAULT_STRATEGY}; reference = coordinate)",
    )
    add_band_options(p)
    p.add_argument(
        "--split",
        default="validation",
        choices=["validation"],
        help="split the objective is computed on (validation only: test is for final numbers)",
    )
    p.add_argument("--limit", type=int, default=None, metavar="N", help="examples per task (default: all)")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size (default 32)")
    p.add_argument(
        "--cache",
        default=None,
        metavar="FILE",
        help="evaluation cache, JSON lines (default: $DPPA_EVAL_CACHE or ~/.cache/dppa/evalcache.jsonl)",
    )
    p.add_argument("--trace", default=None, metavar="FILE.csv", help="also write the trace here (and FILE.json)")
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where the model runs (default: auto = cuda when available)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT (and --trace files) if they exist")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-candidate lines or progress bar")
    add_options(p.add_argument_group("strategy options"), _strategy_options(STRATEGIES))
    add_dp_options(p)


def _strategy_options(strategies) -> list:
    """Every strategy's options as flags; an option whose default differs between strategies says so."""
    from dataclasses import replace

    defaults: dict[str, dict[str, object]] = {}
    for entry in strategies:
        for option in options_of(entry.options):
            defaults.setdefault(option.name, {})[entry.name] = option.default
    merged = []
    for option in strategies.option_fields().values():
        by_strategy = defaults[option.name]
        if len(set(map(repr, by_strategy.values()))) > 1:
            option = replace(option, default=", ".join(f"{v} for {k}" for k, v in by_strategy.items()))
        merged.append(option)
    return merged


def run(args) -> int:
    from dppa.evaluation.harness import parse_task_list
    from dppa.search.registry import STRATEGIES, canonical
    from dppa.search.runner import search_amplification

    dense = args.dense or args.dense_old_flag
    if not dense:
        raise DppaError("--dense FT_OR_JSON is required: the dense fine-tune's folder, or a JSON of its scores")
    if args.dense_old_flag:
        print("note: --reference is now --dense (the dense fine-tune); the old name still works", file=sys.stderr)
    options = {o: getattr(args, o) for o in STRATEGIES.option_fields()}
    report = search_amplification(
        args.base,
        args.delta,
        args.output,
        tasks=parse_task_list(args.tasks),
        dense=dense,
        strategy=canonical(args.strategy),
        options=options,
        densities=args.densities,
        split=args.split,
        limit=args.limit,
        combine=args.combine,
        dp_options=PRUNERS.options_from_args("dp", args),
        scope=args.scope,
        batch_size=args.batch_size,
        cache=args.cache,
        device=args.device,
        trace=args.trace,
        overwrite=args.overwrite,
        progress=not args.quiet,
        log=(lambda _msg: None) if args.quiet else print,
    )
    print(
        f"factors {list(report.result.best_factors)}  objective {report.result.best_score:.4f}  "
        f"candidates {report.result.n_evals} ({report.real_evaluations} evaluated, {report.cache_hits} cached)"
    )
    print(report.output)
    return 0
