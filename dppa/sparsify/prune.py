"""Pruning of delta parameters: magnitude, DARE and Dynamic Pruning (DP). Out-of-scope tensors keep their delta."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from dppa.sparsify.dp import gather_dp_stats, layer_densities, module_densities
from dppa.errors import DppaError
from dppa.io.atomic import check_output_free
from dppa.io.reader import open_checkpoint
from dppa.compute import resolve_device
from dppa.sparsify.scope import DEFAULT_SCOPE, compile_scope
from dppa.sparsify.threshold import keep_count, topk_mask
from dppa.sparsify.transform import check_density, check_is_delta, transform_delta

METHODS = ("magnitude", "dare", "dp")


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the round(density * n) entries of largest |delta|, zero the rest (exact in any dtype)."""
    return delta * topk_mask(delta.abs(), keep_count(density, delta.numel()))


def dare_seed(seed: int, name: str) -> int:
    """Per-tensor seed from the user's seed and the tensor name: independent of tensor order and of the machine."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def dare_prune(delta: torch.Tensor, density: float, seed: int, name: str) -> torch.Tensor:
    """Drop each entry with probability p = 1 - density, rescale survivors by 1 / (1 - p).

    The random draws come from a CPU generator whatever the compute device, so results are identical bit for bit
    across runs, devices and machines for the same seed.
    """
    gen = torch.Generator(device="cpu").manual_seed(dare_seed(seed, name))
    keep = torch.rand(delta.shape, generator=gen, dtype=torch.float32) < density
    return delta.float() * keep.to(delta.device) * (1.0 / density)


def prune_delta(delta: str | os.PathLike, out: str | os.PathLike, *, method: str, density: float, seed: int = 0,
                lamda: float = 0.08, layer_mult: float = 3.0, unit_mult: float = 5.0, scope: str = DEFAULT_SCOPE,
                device: str = "cpu", overwrite: bool = False, progress: bool = True,
                max_shard_size: str = "5GB") -> Path:
    """Prune the delta folder `delta` into `out`; returns `out`."""
    if method not in METHODS:
        raise DppaError(f"--method {method}: unknown pruning method; use one of {', '.join(METHODS)}")
    check_density(density)
    out = Path(out)
    check_output_free(out, overwrite)
    dev = resolve_device(device)
    reader = open_checkpoint(delta)
    check_is_delta(reader)
    regex = compile_scope(scope, reader)
    if not any(regex.search(n) for n in reader.names()):
        raise DppaError(f"{reader.folder}: no tensor matches the pruning scope {scope!r}; pass --scope for this architecture")
    manifest: dict = {"kind": "pruned", "pruned": True, "method": method, "density": density, **regex.record()}
    if method == "dp":
        stats = gather_dp_stats(reader, regex, layer_mult, unit_mult, dev, progress=progress)
        density_of = module_densities(stats, density, lamda)
        manifest.update(lamda=lamda, layer_mult=layer_mult, unit_mult=unit_mult, module_density=density_of,
                        layer_density={str(i): v for i, v in layer_densities(stats, density, lamda).items()},
                        dp_stats=stats.to_json())
    elif method == "dare":
        manifest["seed"] = seed

    def prune(name: str, values: torch.Tensor, layer: int | None) -> torch.Tensor:
        if layer is None:
            return values
        if method == "dare":
            return dare_prune(values, density, seed, name)
        return magnitude_prune(values, density_of[name] if method == "dp" else density)

    return transform_delta(reader, out, prune, scope=regex, device=dev, manifest=manifest,
                           desc=f"prune {method} {Path(delta).name}", overwrite=overwrite, progress=progress,
                           max_shard_size=max_shard_size)
