"""`dppa merge` and `dppa apply`: deltas back into a model."""

import shutil
from pathlib import Path

from dppa.cli import add_command
from dppa.cli.options import add_common, add_method_options, common_kwargs, float_list
from dppa.errors import DppaError
from dppa.io.manifest import read_manifest
from dppa.merging.card import RECIPE_NAME, check_rebuilt, read_recipe, recipe_merge_kwargs
from dppa.merging.merge import apply_delta, merge_deltas
from dppa.merging.registry import MERGERS

ORDER = 40

MERGE_DESCRIPTION = """\
Merge one or more inputs into BASE and write a model folder (base dtype, base config and tokenizer) that
transformers loads.

The inputs are either delta folders (written by extract, prune or amplify) or fine-tuned model folders of BASE,
never a mix: each folder's dppa_manifest.json decides (a delta's manifest says so; a folder without one, or a
model dppa merged, is a model). A model's delta is taken on the fly, tensor by tensor, exactly as `dppa extract`
stores it (fine-tune - base in float32, rounded to the fine-tune's dtype), so the output is the same as extracting
first and merging the deltas, in one pass and without writing the deltas. A PEFT LoRA adapter folder counts as a
fine-tuned model (base + adapter, as peft's merge_and_unload() would make it; see `dppa extract --help`), so
adapters and full fine-tunes mix freely.

methods:
{methods}

examples:
  dppa merge BASE data/amplified/math data/amplified/law -o data/merged/dppa-ties --method ties
  dppa merge BASE data/deltas/math data/deltas/law -o merged --method ties --density 0.2 --scale 1.0
  dppa merge BASE models/math-ft models/law-ft -o merged --method ties --density 0.2   # from model folders
  dppa merge BASE adapters/math-lora models/law-ft -o merged --method ties --density 0.2  # an adapter too
  dppa merge --recipe merged/dppa_recipe.yaml -o rebuilt    # the same merge again, from its recipe

Every merged folder gets a model card (README.md: front matter base_model / tags / library_name, the method and
its settings, each input's lineage and content hash) and dppa_recipe.yaml, which --recipe rebuilds.
"""

APPLY_DESCRIPTION = """\
Write BASE + L * DELTA as a model folder (for example to evaluate one pruned or amplified fine-tune).

example:
  dppa apply BASE data/pruned/math-dp20 -o data/models/math-dp20
"""


def register(subparsers) -> None:
    help = f"merge deltas or fine-tuned models into the base ({', '.join(MERGERS.names())})"
    p = add_command(subparsers, "merge", help, MERGE_DESCRIPTION.format(methods=MERGERS.describe()), run_merge)
    p.add_argument("base", metavar="BASE", nargs="?", help="base model folder")
    p.add_argument(
        "deltas",
        metavar="INPUT",
        nargs="*",
        help="delta folders (extract / prune / amplify outputs), or fine-tuned model or LoRA adapter folders of BASE",
    )
    add_common(p)
    p.add_argument("--method", choices=MERGERS.names(), help="merge method (default ties)")
    p.add_argument("--weights", type=float_list, metavar="W1,W2,..", help="one weight per input (default all 1)")
    p.add_argument("--scale", type=float, metavar="L", help="lambda, scales the merged delta (default 1)")
    p.add_argument(
        "--recipe",
        type=Path,
        metavar="RECIPE",
        help=f"rebuild the merge a {RECIPE_NAME} describes (its inputs, method and settings; no BASE or INPUT, "
        "and no merge settings, with it); the inputs' and the result's content hashes are checked against it",
    )
    p.add_argument("--allow-pickle", action="store_true", help="accept *.bin pickle base and models (can run code!)")
    p.add_argument(
        "--allow-other-base",
        action="store_true",
        help="accept deltas extracted from another base (a deliberate transfer of task vectors onto a related "
        "base; the output's manifest records it): refused otherwise",
    )
    add_method_options(p, MERGERS)

    a = add_command(subparsers, "apply", "base + delta, as a model folder", APPLY_DESCRIPTION, run_apply)
    a.add_argument("base", metavar="BASE", help="base model folder")
    a.add_argument("delta", metavar="DELTA", help="delta folder")
    add_common(a)
    a.add_argument("--scale", type=float, default=1.0, metavar="L", help="scales the delta (default 1)")
    a.add_argument("--allow-pickle", action="store_true", help="accept a *.bin pickle base (can run code!)")
    a.add_argument(
        "--allow-other-base",
        action="store_true",
        help="accept a delta extracted from another base (a deliberate transfer of task vectors onto a related "
        "base; the output's manifest records it): refused otherwise",
    )


def run_merge(args) -> int:
    if args.recipe is not None:
        return run_recipe(args)
    if args.base is None or not args.deltas:
        raise DppaError("give BASE and at least one INPUT, or --recipe RECIPE")
    method = args.method or "ties"
    out = merge_deltas(
        args.base,
        args.deltas,
        args.output,
        method=method,
        weights=args.weights,
        scale=1.0 if args.scale is None else args.scale,
        options=MERGERS.options_from_args(method, args),
        models=True,
        allow_pickle=args.allow_pickle,
        allow_other_base=args.allow_other_base,
        **common_kwargs(args),
    )
    print(out)
    return 0


def run_recipe(args) -> int:
    given = [f"--{k}" for k in ("method", "weights", "scale", *MERGERS.option_fields()) if getattr(args, k, None)]
    if args.base is not None or given:
        what = "BASE and INPUT" if args.base is not None else given[0]
        raise DppaError(f"{what}: not with --recipe (the recipe fixes the merge; edit {args.recipe} instead)")
    body = read_recipe(args.recipe)
    out = merge_deltas(
        **recipe_merge_kwargs(body),
        out=args.output,
        allow_pickle=args.allow_pickle,
        allow_other_base=args.allow_other_base,
        **common_kwargs(args),
    )
    try:
        check_rebuilt(body, read_manifest(out), args.recipe)
    except DppaError:
        shutil.rmtree(out)  # not the model the recipe describes: leave nothing behind
        raise
    print(out)
    return 0


def run_apply(args) -> int:
    out = apply_delta(
        args.base,
        args.delta,
        args.output,
        scale=args.scale,
        allow_pickle=args.allow_pickle,
        allow_other_base=args.allow_other_base,
        **common_kwargs(args),
    )
    print(out)
    return 0
