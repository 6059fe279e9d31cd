"""Dynamic Partition Amplification (docs/method.md): significance bands of DP-kept entries, each with its own factor.

Band b holds the entries DP keeps at density d_b but not at d_{b-1} (d_1 < ... < d_K). With the reference's rule
(`combine="max"`) an entry of band b is multiplied by max(alpha_b, ..., alpha_K): the reference builds one pruned delta
per density, scales it, and keeps the larger magnitude per entry, and an entry of band b is present in the pruned
deltas b..K. `combine="band"` multiplies band b by alpha_b alone. Out-of-scope tensors get max(alpha) * delta.

A delta is represented compactly as its float32 values plus a uint8 band index (0 = pruned, b = band b), so a
candidate for any factors is `delta * table[band_index]`: cheap enough to rebuild per search step in memory.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dppa.compute import resolve_device
from dppa.errors import DppaError
from dppa.io.atomic import check_output_free
from dppa.io.manifest import check_is_delta
from dppa.io.reader import CheckpointReader, open_checkpoint
from dppa.sparsify.dp import DPOptions, DPStats, gather_dp_stats, module_densities
from dppa.sparsify.registry import PRUNERS
from dppa.sparsify.scope import DEFAULT_SCOPE, compile_scope
from dppa.sparsify.threshold import keep_count, topk_mask
from dppa.sparsify.transform import check_density, check_storage, transform_delta

COMBINE_RULES = ("max", "band")


def check_bands(densities: list[float], factors: list[float] | None = None) -> None:
    for d in densities:
        check_density(d, "--densities")
    if any(b <= a for a, b in zip(densities, densities[1:])):
        raise DppaError(f"--densities {densities}: must be strictly increasing, e.g. 0.1,0.2")
    if factors is not None:
        if len(factors) != len(densities):
            raise DppaError(f"--factors: {len(factors)} values for {len(densities)} bands; give one factor per density")
        if any(f < 0 for f in factors):
            raise DppaError(f"--factors {factors}: must be >= 0")


def band_factors(factors: list[float], combine: str = "max") -> list[float]:
    """Factor applied to each band: max(alpha_b..alpha_K) under the reference's rule, alpha_b under 'band'."""
    if combine == "band":
        return list(factors)
    if combine != "max":
        raise DppaError(f"--combine {combine}: unknown rule; use one of {', '.join(COMBINE_RULES)}")
    return [max(factors[b:]) for b in range(len(factors))]


def band_index(delta: torch.Tensor, keep_counts: list[int]) -> torch.Tensor:
    """uint8 tensor: b (1-based) for entries in band b, 0 for pruned entries; keep_counts increasing."""
    magnitude = delta.abs()
    index = torch.zeros(delta.shape, dtype=torch.uint8, device=delta.device)
    for b in range(len(keep_counts), 0, -1):  # widest band first; narrower bands overwrite (the kept sets are nested)
        index[topk_mask(magnitude, keep_counts[b - 1])] = b
    return index


def amplify_tensor(
    delta: torch.Tensor, index: torch.Tensor | None, factors: list[float], combine: str = "max"
) -> torch.Tensor:
    """The amplified delta of one tensor; `index` None means out of scope (whole delta times max factor)."""
    if index is None:
        return delta * max(factors)
    table = torch.tensor([0.0, *band_factors(factors, combine)], dtype=delta.dtype, device=delta.device)
    return delta * table[index.long()]


@dataclass
class BandPlan:
    """Entries kept per band for every in-scope module, from DP statistics."""

    densities: list[float]
    keep_counts: dict[str, list[int]]
    module_density: dict[str, list[float]]

    @classmethod
    def from_stats(cls, stats: DPStats, densities: list[float], lamda: float, floor: float = 0.0) -> BandPlan:
        per_density = [module_densities(stats, d, lamda, floor) for d in densities]
        rho = {j: [p[j] for p in per_density] for j in stats.layer}
        keep = {j: [keep_count(r, stats.numel[j]) for r in rho[j]] for j in stats.layer}
        return cls(list(densities), keep, rho)


def plan_bands(
    reader: CheckpointReader,
    densities: list[float],
    *,
    options: DPOptions | dict | None = None,
    scope: str = DEFAULT_SCOPE,
    device: str = "cpu",
    progress: bool = False,
) -> BandPlan:
    check_bands(densities)
    options = PRUNERS.options_for("dp", options)
    regex = compile_scope(scope, reader)
    stats = gather_dp_stats(reader, regex, options, resolve_device(device), progress=progress)
    if not stats.layer:
        raise DppaError(
            f"{reader.folder}: no tensor matches the pruning scope {scope!r}; pass --scope for this architecture"
        )
    return BandPlan.from_stats(stats, densities, options.lamda, options.floor)


def compute_bands(
    delta: str | os.PathLike,
    densities: list[float],
    *,
    options: DPOptions | dict | None = None,
    scope: str = DEFAULT_SCOPE,
    device: str = "cpu",
):
    """In-memory bands of a delta folder: {name: (float32 delta, uint8 band index or None if out of scope)}.

    Holds the whole delta in memory: meant for the factor search on models that fit in RAM or GPU memory.
    """
    reader = open_checkpoint(delta)
    check_is_delta(reader.folder)
    plan = plan_bands(reader, densities, options=options, scope=scope, device=device)
    dev = resolve_device(device)
    bands = {}
    for name in reader.names():
        values = reader.get(name).to(dev, torch.float32)
        bands[name] = (values, band_index(values, plan.keep_counts[name]) if name in plan.keep_counts else None)
    return bands, plan


def amplify_delta(
    delta: str | os.PathLike,
    out: str | os.PathLike,
    *,
    densities: list[float],
    factors: list[float],
    combine: str = "max",
    options: DPOptions | dict | None = None,
    scope: str = DEFAULT_SCOPE,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    max_shard_size: str = "5GB",
    extra_manifest: dict | None = None,
    storage: str = "sparse",
) -> Path:
    """Write the amplified sparse delta (density d_K) of the delta folder `delta` into `out`.

    `options`: DP's options (DPOptions, a dict of its fields, or None for the defaults).
    """
    check_bands(densities, factors)
    band_factors(factors, combine)  # validates `combine`
    check_storage(storage)
    options = PRUNERS.options_for("dp", options)
    out = Path(out)
    check_output_free(out, overwrite)
    reader = open_checkpoint(delta)
    check_is_delta(reader.folder)
    regex = compile_scope(scope, reader)
    plan = plan_bands(reader, densities, options=options, scope=regex, device=device, progress=progress)

    def amplify(name: str, values: torch.Tensor, layer: int) -> torch.Tensor:
        return amplify_tensor(values.float(), band_index(values, plan.keep_counts[name]), factors, combine)

    manifest = {
        "kind": "amplified",
        "pruned": True,
        "method": "dppa",
        "densities": list(densities),
        "factors": list(factors),
        "band_factors": band_factors(factors, combine),
        "combine": combine,
        **asdict(options),
        **regex.record(),
        "module_density": plan.module_density,
        **(extra_manifest or {}),
    }
    return transform_delta(
        reader,
        out,
        amplify,
        scope=regex,
        device=resolve_device(device),
        manifest=manifest,
        desc=f"amplify {Path(delta).name}",
        overwrite=overwrite,
        progress=progress,
        max_shard_size=max_shard_size,
        storage=storage,
        outside_scale=max(factors),  # what amplify_tensor does out of scope (docs/method.md)
        density=min(1.0, max(densities) + 2 * options.lamda),
    )
