"""A toy pruning method, registered on import: shows that adding a method is one file and one registration."""

from __future__ import annotations

from dataclasses import dataclass

from dppa.sparsify.registry import PRUNERS


@dataclass(frozen=True)
class ToyOptions:
    toy_power: float = 1.0


@PRUNERS.register("toy_top1", options=ToyOptions, help="toy: keep the top entries by |delta| ** toy_power")
def toy_top1(*args, **kwargs):
    raise NotImplementedError("the toy method exists to test registration, not to prune")
