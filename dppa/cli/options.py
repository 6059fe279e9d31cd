"""Options shared by the commands that walk checkpoints."""

from __future__ import annotations

import argparse

from dppa.registry import Registry, add_options, options_of
from dppa.sparsify.dp import DPOptions
from dppa.sparsify.scope import DEFAULT_SCOPE


def add_common(parser: argparse.ArgumentParser, *, device: bool = True) -> None:
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help="output folder (written to a temporary folder, then renamed into place)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (refused otherwise)")
    if device:
        parser.add_argument(
            "--device",
            default="auto",
            choices=["auto", "cpu", "cuda"],
            help="where tensor math runs (default: auto = cuda when available)",
        )
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="largest output shard (default 5GB)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_storage(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage",
        default="sparse",
        choices=["sparse", "dense"],
        help="sparse (default): each tensor stored as a bit mask plus its kept values where that is smaller "
        "(about 0.26x of dense bf16 at density 0.2; every dppa command reads it); dense: plain safetensors",
    )


def add_scope(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scope",
        default=DEFAULT_SCOPE,
        metavar="REGEX",
        help="tensors the pruning touches: auto (default: every weight matrix of every block of the "
        "language model, worked out from config.json), or a regex with a group (?P<layer>\\d+) "
        "capturing the block index",
    )


def add_method_options(parser: argparse.ArgumentParser, registry: Registry) -> None:
    """One argument group per entry of `registry` with options, each option added once (entries may share them)."""
    added: set[str] = set()
    for entry in registry:
        options = [o for o in options_of(entry.options) if o.name not in added]
        if options:
            add_options(parser.add_argument_group(f"{entry.name} options"), options)
            added.update(o.name for o in options)


def add_dp_options(parser: argparse.ArgumentParser) -> None:
    """--scope and Dynamic Pruning's options, for the commands that split a delta into DP bands; read them back
    with `PRUNERS.options_from_args("dp", args)` and `args.scope`."""
    add_scope(parser)
    add_options(parser.add_argument_group("Dynamic Pruning options (docs/method.md)"), options_of(DPOptions))


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


def add_band_options(parser: argparse.ArgumentParser) -> None:
    """DPA's bands: their densities and how a band's factor is chosen (amplify and search)."""
    from dppa.sparsify.bands import COMBINE_RULES

    parser.add_argument(
        "--densities",
        type=float_list,
        default=[0.1, 0.2],
        metavar="D1,D2,..",
        help="increasing band densities (default 0.1,0.2)",
    )
    parser.add_argument(
        "--combine",
        choices=COMBINE_RULES,
        default="max",
        help="max: reference rule, band b gets max(alpha_b..alpha_K); band: band b gets alpha_b",
    )
