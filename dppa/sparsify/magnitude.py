"""Magnitude pruning: keep the round(density * n) entries of largest |delta| in each in-scope tensor."""

from __future__ import annotations

import torch

from dppa.registry import NoOptions
from dppa.sparsify.registry import PRUNERS, Plan
from dppa.sparsify.threshold import keep_count, topk_mask


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the round(density * n) entries of largest |delta|, zero the rest (exact in any dtype)."""
    return delta * topk_mask(delta.abs(), keep_count(density, delta.numel()))


@PRUNERS.register("magnitude", options=NoOptions, help="keep the round(D * n) largest |delta| of each tensor")
def plan_magnitude(reader, scope, density: float, options: NoOptions, device, progress) -> Plan:
    return Plan(lambda name, values, layer: magnitude_prune(values, density))
