"""Merges computed by hand, in plain torch on the state dicts, to check the engine against."""

import torch
from transformers import AutoModelForCausalLM


def trim(delta, density):
    """TIES's trim: keep the floor(density * n) largest |delta|; ties go to the lowest flat index."""
    flat = delta.flatten()
    keep = int(density * flat.numel())
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    kept = torch.zeros_like(flat)
    kept[order[:keep]] = flat[order[:keep]]
    return kept.view_as(delta)


def ties(deltas, weights):
    weighted = torch.stack([w * d for w, d in zip(weights, deltas)])
    elected = torch.sign(weighted.sum(0))
    agrees = (weighted * elected) > 0
    total = (weighted * agrees).sum(0)
    weight_sum = (torch.tensor(weights).view(-1, *[1] * deltas[0].dim()) * agrees).sum(0)
    return torch.where(weight_sum > 0, total / weight_sum, torch.zeros_like(total))


def expected_merge(base_dir, ft_dirs, method, density, scale, weights):
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    fts = [AutoModelForCausalLM.from_pretrained(d).state_dict() for d in ft_dirs]
    with torch.no_grad():
        for name, value in model.state_dict().items():
            b = value.float()
            # deltas are stored in the source dtype (extract's default), so round them the same way here
            deltas = [(ft[name].float() - b).to(value.dtype).float() for ft in fts]
            if method == "ties":
                merged = ties([trim(d, density) for d in deltas], weights)
            else:
                merged = sum(w * d for w, d in zip(weights, deltas))
            value.copy_((b + scale * merged).to(value.dtype))
    return model
