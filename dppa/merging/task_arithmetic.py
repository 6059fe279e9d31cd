"""Task arithmetic: base + scale * sum_m w_m * delta_m."""

from __future__ import annotations

import torch

from dppa.merging.registry import MERGERS, MergePlan
from dppa.registry import NoOptions


def task_arithmetic(base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], scale: float) -> torch.Tensor:
    for w, d in zip(weights, deltas):
        base.add_(d, alpha=w * scale)
    return base


@MERGERS.register("task_arithmetic", options=NoOptions, help="base + L * sum_m w_m * delta_m")
def plan_task_arithmetic(options: NoOptions) -> MergePlan:
    return MergePlan(task_arithmetic)
