"""The registries of methods: the built-in names, and options from dicts, instances or CLI arguments."""

import argparse
from dataclasses import dataclass, field

import pytest

from dppa.errors import DppaError
from dppa.merging.registry import MERGERS
from dppa.registry import Registry, add_options, options_of
from dppa.sparsify.dp import DPOptions
from dppa.sparsify.registry import PRUNERS


def test_built_in_methods_in_order():
    assert PRUNERS.names()[:3] == ("magnitude", "dare", "dp")
    assert MERGERS.names() == ("task_arithmetic", "ties")
    assert PRUNERS.get("dp").options is DPOptions


def test_options_from_none_dict_or_instance():
    assert PRUNERS.options_for("dp", None) == DPOptions()
    assert PRUNERS.options_for("dp", {"lamda": 0.1, "module_mult": None}) == DPOptions(lamda=0.1)
    mine = DPOptions(layer_mult=2.0)
    assert PRUNERS.options_for("dp", mine) is mine
    assert MERGERS.options_for("ties", {"density": 0.3}).density == 0.3


def test_an_option_the_method_lacks_is_refused():
    with pytest.raises(DppaError, match="--seed is an option of dare, not of pruning method magnitude"):
        PRUNERS.options_for("magnitude", {"seed": 3})
    with pytest.raises(DppaError, match=r"scope: not an option of pruning method dp \(its options: lamda, "):
        PRUNERS.options_for("dp", {"scope": "x"})
    with pytest.raises(DppaError, match="--method nope: unknown pruning method; use one of magnitude, dare, dp"):
        PRUNERS.get("nope")


def test_cli_flags_are_typed_and_defaulted_from_the_dataclass():
    @dataclass(frozen=True)
    class Options:
        steps: int = field(default=4, metadata={"help": "how many"})
        rate_hint: float | None = None

    registry = Registry("widget", "--widget")
    registry.register("w", options=Options)(object())
    parser = argparse.ArgumentParser()
    add_options(parser, options_of(Options))
    assert "how many (default 4)" in parser.format_help()
    assert registry.options_from_args("w", parser.parse_args(["--steps", "7"])) == Options(steps=7)
    assert registry.options_from_args("w", parser.parse_args(["--rate-hint", "0.5"])) == Options(rate_hint=0.5)
