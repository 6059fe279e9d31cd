"""A toy pruning method: keep the single largest |delta| of each in-scope tensor, times `toy_power`.

All it takes to add a pruning method: this file, whose decorator registers it on import.
"""

from dataclasses import dataclass, field

import torch

from dppa.sparsify.registry import PRUNERS, Plan


@dataclass(frozen=True)
class ToyOptions:
    toy_power: float = field(default=1.0, metadata={"help": "factor on the kept entry"})


@PRUNERS.register("toy_top1", options=ToyOptions, help="keep the largest |delta| of each tensor, times --toy-power")
def plan_toy_top1(reader, scope, density, options: ToyOptions, device, progress) -> Plan:
    def prune(name: str, values: torch.Tensor, layer: int) -> torch.Tensor:
        flat = values.reshape(-1)
        kept = torch.zeros_like(flat)
        top = int(flat.abs().argmax())
        kept[top] = flat[top] * options.toy_power
        return kept.view_as(values)

    return Plan(prune, {"kept_per_tensor": 1})
