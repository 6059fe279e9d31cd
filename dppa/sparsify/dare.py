"""DARE: drop each delta entry with probability p = 1 - density and rescale the survivors by 1 / (1 - p)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from dppa.sparsify.registry import PRUNERS, Plan


@dataclass(frozen=True)
class DareOptions:
    seed: int = field(default=0, metadata={"help": "DARE's random seed"})


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


@PRUNERS.register(
    "dare",
    options=DareOptions,
    help="drop each entry with probability 1 - D, rescale survivors by 1 / D (seeded; identical bit for bit)",
)
def plan_dare(reader, scope, density: float, options: DareOptions, device, progress) -> Plan:
    return Plan(lambda name, values, layer: dare_prune(values, density, options.seed, name))
