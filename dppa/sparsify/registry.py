"""The pruning methods, by name: `PRUNERS`. Adding one is one module with one `@PRUNERS.register(...)` (the
built-in ones are imported by `dppa/sparsify/__init__.py`, so importing any part of the package registers them).

A method is planned once per delta, then applied tensor by tensor: `plan(reader, scope, density, options, device,
progress) -> Plan` may read the whole delta first (DP gathers outlier statistics over every in-scope tensor), and
`Plan.prune(name, values, layer)` then prunes one in-scope tensor. Out-of-scope tensors keep their delta and never
reach `prune`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dppa.io.reader import CheckpointReader
from dppa.registry import Registry

# prune(name, delta in its stored dtype on the compute device, layer index) -> pruned delta (any float dtype)
PruneFn = Callable[[str, torch.Tensor, int], torch.Tensor]


@dataclass
class Plan:
    """A method's decisions for one delta: the per-tensor rule and what to record in the output's manifest."""

    prune: PruneFn
    manifest: dict = field(default_factory=dict)


# plan(reader, scope, density, options, device, progress) -> Plan
Planner = Callable[[CheckpointReader, re.Pattern, float, Any, torch.device, bool], Plan]


PRUNERS: Registry[Planner] = Registry("pruning method", "--method")
