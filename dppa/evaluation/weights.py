"""Search candidates built in memory: a loaded base model's weights set in place to base + amplified delta.

The factor search evaluates many factor vectors for one fine-tune. Writing each candidate to disk (amplify, then
apply) costs two full model writes per step; here the model is loaded once, its base weights are copied aside, and
each candidate is a few tensor operations per parameter: ``weight = base + amplify_tensor(delta, band index,
factors)``, the same arithmetic as ``dppa amplify`` followed by ``dppa apply``, so scores match the folder route.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch

from dppa.sparsify.bands import amplify_tensor, band_factors, compute_bands
from dppa.errors import DppaError
from dppa.io.reader import open_checkpoint

# name -> (delta in float32, uint8 band index with 0 = pruned and b = band b, or None when out of scope)
Bands = Mapping[str, "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass
class _Slot:
    """One parameter: where the candidate goes, its base weights, and its share of the bands."""

    param: torch.Tensor
    base: torch.Tensor
    delta: torch.Tensor
    index: torch.Tensor | None
    stored_dtype: torch.dtype  # dtype the folder route writes the amplified delta in; rounding to it keeps parity


class CandidateBuilder:
    """Sets ``model``'s weights to base + amplified delta for any factors, in place, and restores the base.

    ``model`` must hold the base weights when the builder is made. ``bands`` maps tensor names (the model's parameter
    names) to the float32 delta and its band index, as ``dppa.sparsify.bands.compute_bands`` gives them; ``delta_dtypes``
    are the delta folder's stored dtypes (float32 when omitted). Memory: one extra copy of the touched parameters.
    """

    def __init__(self, model: torch.nn.Module, bands: Bands, n_bands: int, combine: str = "max",
                 delta_dtypes: Mapping[str, torch.dtype] | None = None):
        band_factors([1.0] * n_bands, combine)  # validates `combine`
        self.model = model
        self.n_bands = n_bands
        self.combine = combine
        self.factors: tuple[float, ...] | None = None  # the candidate the model holds now; None = the base
        params = dict(model.named_parameters(remove_duplicate=False))
        self._slots = [self._slot(params, name, delta, index, (delta_dtypes or {}).get(name, torch.float32))
                       for name, (delta, index) in bands.items()]

    @staticmethod
    def _slot(params: dict, name: str, delta: torch.Tensor, index, stored_dtype: torch.dtype) -> _Slot:
        if name not in params:
            raise DppaError(f"delta tensor {name!r} is not a parameter of the model; was the delta extracted from "
                            "this model's base?")
        param = params[name]
        if tuple(param.shape) != tuple(delta.shape):
            raise DppaError(f"delta tensor {name!r} has shape {list(delta.shape)} but the model's parameter has "
                            f"{list(param.shape)}")
        device = param.device
        return _Slot(param, param.detach().clone(), delta.to(device, torch.float32),
                     None if index is None else index.to(device), stored_dtype)

    @torch.no_grad()
    def apply(self, factors: Sequence[float]) -> None:
        """Make the model the candidate for ``factors`` (one per band), whatever it held before."""
        factors = [float(f) for f in factors]
        if len(factors) != self.n_bands:
            raise DppaError(f"{len(factors)} factors for {self.n_bands} bands; give one factor per band")
        if any(f < 0 for f in factors):
            raise DppaError(f"factors {factors}: must be >= 0")
        for slot in self._slots:
            amplified = amplify_tensor(slot.delta, slot.index, factors, self.combine)
            if slot.stored_dtype != torch.float32:
                amplified = amplified.to(slot.stored_dtype).float()
            # amplified is a fresh float32 tensor: adding the base into it leaves the saved base untouched.
            slot.param.copy_(amplified.add_(slot.base))
        self.factors = tuple(factors)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the base weights back."""
        for slot in self._slots:
            slot.param.copy_(slot.base)
        self.factors = None

    @contextmanager
    def candidate(self, factors: Sequence[float]) -> Iterator[torch.nn.Module]:
        """``with builder.candidate(f) as model: evaluate(model)``; the base is back afterwards, even on error."""
        self.apply(factors)
        try:
            yield self.model
        finally:
            self.restore()


def builder_for_delta(model: torch.nn.Module, delta: str | os.PathLike, densities: Sequence[float], *,
                      combine: str = "max", device: str = "cpu", **dp_options) -> CandidateBuilder:
    """A CandidateBuilder for the delta folder ``delta`` split into bands at ``densities`` (DP options as amplify)."""
    bands, _ = compute_bands(delta, list(densities), device=device, **dp_options)
    reader = open_checkpoint(delta)
    dtypes = {name: reader.dtype(name) for name in bands}
    return CandidateBuilder(model, bands, len(densities), combine, dtypes)
