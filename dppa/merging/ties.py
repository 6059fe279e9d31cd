"""TIES (docs/method.md): trim each delta to its largest entries, elect a sign per entry, disjoint mean."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from dppa.io.codec import ties_bf16
from dppa.merging.registry import MERGERS, MergePlan
from dppa.sparsify.threshold import CountedChunks, Threshold, find_threshold
from dppa.sparsify.transform import check_density


@dataclass(frozen=True)
class TiesOptions:
    density: float | None = field(
        default=None, metadata={"help": "TIES trim density for unpruned deltas (default: no trim)"}
    )

    def __post_init__(self):
        if self.density is not None:
            check_density(self.density)


def ties_trim_count(density: float, numel: int) -> int:
    """Entries kept by TIES's trim: floor(density * n), as in the TIES reference code and mergekit."""
    return max(0, min(numel, int(density * numel)))


def trim_threshold(
    key_chunks: Callable[[], Iterable[torch.Tensor]],
    numel: int,
    density: float,
    bits: int,
    chunk_at: Callable[[int], torch.Tensor] | None = None,
    counted: CountedChunks | None = None,
) -> Threshold:
    """TIES trim threshold of one delta tensor from its magnitude keys, streamed in order by `key_chunks()` (read
    from disk, or computed on the fly); `bits`: `key_bits` of the delta's dtype; `chunk_at(i)`: the i-th chunk;
    `counted`: as `find_threshold`'s."""
    return find_threshold(key_chunks, numel, ties_trim_count(density, numel), bits, chunk_at, counted)


def ties_combine(weighted: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES on weighted deltas: elect sign(sum), then the weighted mean of the nonzero entries agreeing with it.

    Works in place on `weighted` (temporaries of the caller) and never stacks them, so memory stays at a few
    buffers whatever the number of deltas. An entry agrees when (w_m delta_m) * sign > 0. Only arithmetic
    kernels run here, no boolean masks: on CPU those are several times slower than a multiply.
    """
    elected = weighted[0].add(0.0)  # + 0.0 turns -0.0 into 0.0, as a sum started from zeros does
    for wd in weighted[1:]:
        elected.add_(wd)
    elected.sign_()
    total, weight_sum, agrees = None, None, None
    for wd, w in zip(weighted, weights):
        agreeing = wd.mul_(elected).clamp_(min=0)  # |entry| where it agrees with the elected sign, else 0
        agrees = torch.sign(agreeing, out=agrees)  # 1 where it agrees, else 0
        if total is None:
            total, weight_sum = agreeing.add_(0.0), agrees.mul(w)
        else:
            total.add_(agreeing)
            weight_sum.add_(agrees, alpha=w)
    total.mul_(elected)
    if _divides_by_tiny(weights):
        # a weight sum is 0 only where nothing agrees (total 0 there too): 0 / tiny = 0, as 0 / 1
        return total.div_(weight_sum.clamp_(min=torch.finfo(torch.float32).tiny))
    return total.div_(weight_sum.masked_fill_(weight_sum == 0, 1.0))


def _divides_by_tiny(weights: list[float]) -> bool:
    return all(w == 0 or w >= torch.finfo(torch.float32).tiny for w in weights)


def ties_merge(base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], scale: float) -> torch.Tensor:
    """base + scale * TIES(deltas); deltas already trimmed."""
    weighted = [d if w == 1 else d.mul_(w) for d, w in zip(deltas, weights)]  # x * 1 is x, bit for bit
    return base.add_(ties_combine(weighted, weights), alpha=scale)


def ties_merge_bf16(base_bits, deltas: list[torch.Tensor], weights: list[float], scale: float, out_bits) -> bool:
    """`ties_merge` on a bf16 base chunk, rounded to bf16 into `out_bits`, by the compiled kernel (dppa/io/_codec.c:
    the same operations in the same order, so the same bits, in one pass instead of a dozen); returns whether every
    merged entry is finite. The deltas are read, not changed."""
    arrays = [d.numpy() for d in deltas]
    return ties_bf16(base_bits, arrays, [float(w) for w in weights], float(scale), _divides_by_tiny(weights), out_bits)


@MERGERS.register(
    "ties",
    options=TiesOptions,
    help="trim each unpruned delta to its top --density by magnitude (every tensor; skipped for deltas "
    "already pruned by `dppa prune`/`dppa amplify`), elect a sign per entry from the weighted "
    "sum, take the weighted mean of the nonzero deltas agreeing with it, times L",
)
def plan_ties(options: TiesOptions) -> MergePlan:
    return MergePlan(ties_merge, trim_density=options.density, combine_bf16=ties_merge_bf16 if ties_bf16 else None)
