"""Options shared by the commands that walk checkpoints."""

from __future__ import annotations

import argparse

from dppa.sparsify.scope import DEFAULT_SCOPE


def add_common(parser: argparse.ArgumentParser, *, device: bool = True) -> None:
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output folder (written to a temporary folder, then renamed into place)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (refused otherwise)")
    if device:
        parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                            help="where tensor math runs (default: auto = cuda when available)")
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="largest output shard (default 5GB)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_dp_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Dynamic Pruning parameters (spec section 1)")
    group.add_argument("--lamda", type=float, default=0.08, help="largest layer/module density adjustment (default 0.08)")
    group.add_argument("--layer-mult", type=float, default=3.0, help="layer outlier = |delta| > this x layer mean (default 3)")
    group.add_argument("--unit-mult", type=float, default=5.0, help="module outlier = |delta| > this x module mean (default 5)")
    group.add_argument("--scope", default=DEFAULT_SCOPE, metavar="REGEX",
                       help="tensors the pruning touches: a regex with a group (?P<layer>\\d+) capturing the block "
                            "index, or auto (default): every weight matrix of every block of the language model, "
                            "worked out from config.json")


def float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 0.1,0.2") from None


def common_kwargs(args) -> dict:
    """Engine keyword arguments of the options added by `add_common`."""
    kwargs = {"overwrite": args.overwrite, "progress": not args.quiet, "max_shard_size": args.max_shard_size}
    if hasattr(args, "device"):
        kwargs["device"] = args.device
    return kwargs


def dp_kwargs(args) -> dict:
    """Engine keyword arguments of the options added by `add_dp_options`."""
    return {"lamda": args.lamda, "layer_mult": args.layer_mult, "unit_mult": args.unit_mult, "scope": args.scope}
