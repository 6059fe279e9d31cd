"""STAND-IN (pipeline branch): the pruning-method registry's agreed interface, until the engine branch's lands."""

from __future__ import annotations

from dataclasses import dataclass

from dppa.registry import Registry

PRUNERS: Registry = Registry("pruning method", "--method")


@dataclass(frozen=True)
class DareOptions:
    seed: int = 0


@dataclass(frozen=True)
class DPOptions:
    lamda: float = 0.08
    layer_mult: float = 3.0
    unit_mult: float = 5.0

    def __post_init__(self):
        if not 0 <= self.lamda < 1:
            raise ValueError(f"lamda: must be in [0, 1), got {self.lamda}")
        for name in ("layer_mult", "unit_mult"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")


def _prune(method: str):
    def run(delta, out, *, density, options, **kwargs):
        from dataclasses import asdict

        from dppa.sparsify.prune import prune_delta

        return prune_delta(delta, out, method=method, density=density, **asdict(options), **kwargs)
    return run


PRUNERS.register("magnitude", help="keep the largest |delta| entries")(_prune("magnitude"))
PRUNERS.register("dare", options=DareOptions, help="random drop and rescale")(_prune("dare"))
PRUNERS.register("dp", options=DPOptions, help="Dynamic Pruning")(_prune("dp"))
