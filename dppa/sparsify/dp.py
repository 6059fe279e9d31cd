"""Dynamic Pruning (docs/method.md): per-layer and per-module densities from how outlier-heavy each one is.

The statistics (outlier percentages) do not depend on the target density, so they are gathered once per delta and
`module_densities` maps them to densities for any target: rho_j(d) = clamp(d + layer_adj[i] + module_adj[j], f*d, 1),
with f = `floor` (0 by default: the reference's arithmetic, clamped at 0 where it would go negative).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch

from dppa.compute import Progress, chunk_workers, ordered_map
from dppa.errors import DppaError
from dppa.io.reader import CheckpointReader
from dppa.sparsify.magnitude import magnitude_prune
from dppa.sparsify.registry import PRUNERS, Plan
from dppa.sparsify.scope import layer_of


@dataclass(frozen=True)
class DPOptions:
    """Dynamic Pruning's parameters (the reference's defaults); DPA's bands use the same ones."""

    lamda: float = field(default=0.08, metadata={"help": "largest layer/module density adjustment"})
    layer_mult: float = field(default=3.0, metadata={"help": "layer outlier = |delta| > this x layer mean"})
    module_mult: float = field(default=5.0, metadata={"help": "module outlier = |delta| > this x module mean"})
    floor: float = field(
        default=0.0,
        metadata={
            "help": "least module density, as a share of the target density (0: clamp at 0, which at low "
            "densities can prune whole modules away; 0.5: every module keeps at least half the target)"
        },
    )

    def __post_init__(self):
        if not 0 <= self.lamda < 1:
            raise DppaError(f"--lamda {self.lamda}: must be in [0, 1) (a density adjustment)")
        if not 0 <= self.floor <= 1:
            raise DppaError(f"--floor {self.floor}: must be in [0, 1] (a share of the target density)")
        for flag, value in (("--layer-mult", self.layer_mult), ("--module-mult", self.module_mult)):
            if not value > 0:
                raise DppaError(f"{flag} {value}: must be > 0 (a multiple of the mean |delta|)")


@dataclass
class DPStats:
    """Outlier statistics of the in-scope modules of one delta."""

    layer: dict[str, int] = field(default_factory=dict)  # module name -> layer index
    numel: dict[str, int] = field(default_factory=dict)
    unit_outlier_pct: dict[str, float] = field(default_factory=dict)  # u_j before adjustment
    layer_outlier_pct: dict[int, float] = field(default_factory=dict)  # r_i before adjustment

    def to_json(self) -> dict:
        data = asdict(self)
        data["layer_outlier_pct"] = {str(k): v for k, v in self.layer_outlier_pct.items()}
        return data


def outlier_pct(magnitude: torch.Tensor, threshold: float) -> float:
    return 100.0 * int(torch.count_nonzero(magnitude > threshold)) / magnitude.numel()


def gather_dp_stats(
    reader: CheckpointReader, scope: re.Pattern, options: DPOptions, device: torch.device, progress: bool = False
) -> DPStats:
    """Two streaming passes over the in-scope tensors: module statistics and layer means, then layer outlier counts."""
    in_scope = [n for n in reader.names() if layer_of(scope, n) is not None]
    total_bytes = 2 * sum(reader.info(n).nbytes for n in in_scope)
    with Progress("DP statistics", total_bytes, 2 * len(in_scope), progress) as bar:
        return _gather(reader, in_scope, scope, options.layer_mult, options.module_mult, device, bar)


def _gather(
    reader: CheckpointReader,
    in_scope: list[str],
    scope: re.Pattern,
    layer_mult: float,
    module_mult: float,
    device: torch.device,
    bar: Progress,
) -> DPStats:
    def magnitude(name: str) -> torch.Tensor:
        return reader.get(name).to(device, torch.float32).abs_()

    def module_stats(name: str) -> tuple[int, float, float]:
        values = magnitude(name)
        n, total = values.numel(), float(values.sum(dtype=torch.float64))
        return n, total, outlier_pct(values, module_mult * total / n) if n else 0.0

    stats = DPStats()
    abs_sum: dict[str, float] = {}
    with chunk_workers() as (pool, workers):
        for name, (n, total, unit_pct) in zip(in_scope, ordered_map(pool, workers, module_stats, in_scope, workers)):
            stats.layer[name], stats.numel[name], abs_sum[name] = layer_of(scope, name), n, total
            stats.unit_outlier_pct[name] = unit_pct
            bar.advance(reader.info(name).nbytes)
            bar.tensor_done()
        layer_sum: dict[int, float] = defaultdict(float)
        layer_numel: dict[int, int] = defaultdict(int)
        for name, layer in stats.layer.items():
            layer_sum[layer] += abs_sum[name]
            layer_numel[layer] += stats.numel[name]

        def layer_outliers(name: str) -> int:
            layer = stats.layer[name]
            return int(torch.count_nonzero(magnitude(name) > layer_mult * layer_sum[layer] / layer_numel[layer]))

        layer_count: dict[int, int] = defaultdict(int)
        for name, count in zip(in_scope, ordered_map(pool, workers, layer_outliers, in_scope, workers)):
            layer_count[stats.layer[name]] += count
            bar.advance(reader.info(name).nbytes)
            bar.tensor_done()
    stats.layer_outlier_pct = {i: 100.0 * layer_count[i] / layer_numel[i] for i in sorted(layer_numel)}
    return stats


def _scale_to(values: dict, lamda: float) -> dict:
    """Scale so that the largest |value| is lamda (left alone when all are zero)."""
    peak = max((abs(v) for v in values.values()), default=0.0)
    return {k: v * lamda / peak for k, v in values.items()} if peak > 0 else dict(values)


def layer_adjustments(layer_outlier_pct: dict[int, float], lamda: float) -> dict[int, float]:
    """Step 2: r <- r - mean(r); r <- r * lamda / max|r|."""
    if not layer_outlier_pct:
        return {}
    mean = sum(layer_outlier_pct.values()) / len(layer_outlier_pct)
    return _scale_to({i: r - mean for i, r in layer_outlier_pct.items()}, lamda)


def module_adjustments(unit_outlier_pct: dict[str, float], numel: dict[str, int], lamda: float) -> dict[str, float]:
    """Step 4: u <- u / mean(u); u <- u - size-weighted mean(u); u <- u * lamda / max|u|.

    When no module has outliers (mean(u) = 0) every adjustment is 0 (ours: the reference divides by zero).
    """
    if not unit_outlier_pct:
        return {}
    mean = sum(unit_outlier_pct.values()) / len(unit_outlier_pct)
    if mean == 0:
        return {j: 0.0 for j in unit_outlier_pct}
    u = {j: v / mean for j, v in unit_outlier_pct.items()}
    weighted = sum(u[j] * numel[j] for j in u) / sum(numel[j] for j in u)
    return _scale_to({j: v - weighted for j, v in u.items()}, lamda)


def module_densities(stats: DPStats, density: float, lamda: float, floor: float = 0.0) -> dict[str, float]:
    """Step 5: rho_j = clamp(d + layer_adj[layer(j)] + module_adj[j], floor * d, 1)."""
    layer_adj = layer_adjustments(stats.layer_outlier_pct, lamda)
    module_adj = module_adjustments(stats.unit_outlier_pct, stats.numel, lamda)
    least = floor * density
    return {j: min(1.0, max(least, density + layer_adj[stats.layer[j]] + module_adj[j])) for j in stats.layer}


def layer_densities(stats: DPStats, density: float, lamda: float) -> dict[int, float]:
    """D_i = d + r_i (step 2), reported in manifests."""
    return {i: density + r for i, r in layer_adjustments(stats.layer_outlier_pct, lamda).items()}


@PRUNERS.register(
    "dp",
    options=DPOptions,
    help="Dynamic Pruning: magnitude pruning with per-layer and per-module densities adjusted by how "
    "outlier-heavy each is; the chosen densities are written to the manifest",
)
def plan_dp(
    reader: CheckpointReader,
    scope: re.Pattern,
    density: float,
    options: DPOptions,
    device: torch.device,
    progress: bool,
) -> Plan:
    stats = gather_dp_stats(reader, scope, options, device, progress=progress)
    density_of = module_densities(stats, density, options.lamda, options.floor)
    manifest = {
        "module_density": density_of,
        "layer_density": {str(i): v for i, v in layer_densities(stats, density, options.lamda).items()},
        "dp_stats": stats.to_json(),
    }
    return Plan(lambda name, values, layer: magnitude_prune(values, density_of[name]), manifest)
