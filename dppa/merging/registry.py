"""The merge methods, by name: `MERGERS`. Adding one is one module with one `@MERGERS.register(...)` (the
built-in ones are imported by `dppa/merging/__init__.py`).

A method turns its options into a `MergePlan`: the chunk combiner and, optionally, the density to which each
unpruned delta is trimmed per tensor first (TIES's trim) and a compiled combiner for bf16 bases. The streaming driver
(merge.py) reads the same range of the base and of every delta and hands the chunks to `combine`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dppa.registry import Registry

# combine(base chunk, delta chunks, weights, scale) -> merged chunk, all float32 on the compute device; it may work
# in place on its arguments (they are temporaries of the driver)
CombineFn = Callable[[torch.Tensor, list[torch.Tensor], list[float], float], torch.Tensor]


# combine_bf16(base chunk's bf16 bits, float32 delta chunks, weights, scale, out: the merged chunk's bf16 bits) ->
# whether every merged entry is finite: `combine` and the casts around it fused, with the same bits, on the CPU
CombineBf16Fn = Callable[[Any, list[torch.Tensor], list[float], float, Any], bool]


@dataclass(frozen=True)
class MergePlan:
    combine: CombineFn
    trim_density: float | None = None  # keep this share of each unpruned delta's entries, per tensor, by magnitude
    combine_bf16: CombineBf16Fn | None = None  # used for bf16 bases on the CPU where given


MERGERS: Registry[Callable[[Any], MergePlan]] = Registry("merge method", "--method")
