"""Magnitude thresholds in O(n): exact top-k masks without sorting the tensor.

A random sample brackets the k-th largest value; one counting pass confirms the bracket, and an exact selection
(`kthvalue`) runs only on the few elements inside it. Ties at the threshold are broken by lowest flat index, so the
kept set for a smaller k is always a subset of the kept set for a larger k (DP's nested bands rely on it).
"""

from __future__ import annotations

import math

import torch

SAMPLE_SIZE = 1 << 16
BRACKET_MIN_NUMEL = 1 << 20


def keep_count(density: float, numel: int) -> int:
    """Entries kept at `density` (spec: round(rho * n)); Python rounds halves to even."""
    return max(0, min(numel, int(round(density * numel))))


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest element (1-based) of a flat tensor, as a 0-d tensor; 1 <= k <= numel."""
    n = values.numel()
    if n < BRACKET_MIN_NUMEL:
        return torch.kthvalue(values, n - k + 1).values
    gen = torch.Generator(device="cpu").manual_seed(n)
    idx = torch.randint(0, n, (SAMPLE_SIZE,), generator=gen).to(values.device)
    sample = values[idx]
    frac = k / n
    # A margin of ~6 standard deviations of the sample quantile keeps the bracket failure rate negligible.
    margin = 6.0 * math.sqrt(max(frac * (1 - frac), 1.0 / n) / SAMPLE_SIZE) + 2.0 / SAMPLE_SIZE
    lo_q, hi_q = max(0.0, 1 - frac - margin), min(1.0, 1 - frac + margin)
    lo, hi = torch.quantile(sample.float(), torch.tensor([lo_q, hi_q], device=values.device)).to(values.dtype)
    above = int(torch.count_nonzero(values > hi))
    inside_mask = (values >= lo) & (values <= hi)
    inside = int(torch.count_nonzero(inside_mask))
    rank = k - above  # rank of the answer from the top, among the bracketed values
    if 1 <= rank <= inside:
        candidates = values[inside_mask]
        return torch.kthvalue(candidates, inside - rank + 1).values
    return torch.kthvalue(values, n - k + 1).values  # bracket missed (rare): exact selection on everything


def topk_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly k entries with the largest values; ties go to the lowest flat index."""
    flat = magnitude.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(flat, dtype=torch.bool).view(magnitude.shape)
    if k <= 0:
        return torch.zeros_like(flat, dtype=torch.bool).view(magnitude.shape)
    threshold = kth_largest(flat, k)
    mask = flat > threshold
    missing = k - int(torch.count_nonzero(mask))
    if missing > 0:
        ties = (flat == threshold).nonzero().reshape(-1)[:missing]
        mask[ties] = True
    return mask.view(magnitude.shape)
