"""Candidates built in memory: a loaded base model's weights set in place, and the base put back.

The factor search evaluates many factor vectors for one fine-tune, and evaluation in memory scores base + delta
without writing a model. Writing each candidate to disk (amplify, then apply) costs two full model writes per step;
here the model is loaded once and each candidate is a few tensor operations per parameter, with the same
arithmetic as the folder route (``dppa amplify`` then ``dppa apply``: float32 sums rounded to the model's dtype), so
scores match it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from dppa.errors import DppaError
from dppa.io.reader import open_checkpoint
from dppa.sparsify.bands import amplify_tensor, band_factors, compute_bands
from dppa.sparsify.scope import DEFAULT_SCOPE

# name -> (delta in float32, uint8 band index with 0 = pruned and b = band b, or None when out of scope)
Bands = Mapping[str, "tuple[torch.Tensor, torch.Tensor | None]"]


class CandidateWeights:
    """Sets ``model``'s parameters to base + something, in place, and restores the base.

    - ``amplify(factors)``: base + the amplified delta of ``bands`` (as ``dppa.sparsify.bands.compute_bands`` gives
      them; ``delta_dtypes``: the delta folder's stored dtypes, float32 when omitted);
    - ``add_delta(folder, scale)``: base + scale x a delta folder's tensors;
    - ``load_weights(folder)``: a model folder's weights (a fine-tune of the same architecture).

    Each call starts from the base, so candidates never accumulate. ``model`` must hold the base weights when this
    is made; a parameter's base is copied aside the first time it is touched (memory: one extra copy of the touched
    parameters).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        bands: Bands | None = None,
        n_bands: int = 0,
        combine: str = "max",
        delta_dtypes: Mapping[str, torch.dtype] | None = None,
    ):
        band_factors([1.0], combine)  # validates `combine`
        self.model = model
        self.n_bands = n_bands
        self.combine = combine
        self.factors: tuple[float, ...] | None = None  # the amplified candidate the model holds now, if any
        self._params = dict(model.named_parameters(remove_duplicate=False))
        self._base: dict[str, torch.Tensor] = {}
        self._bands: dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.dtype]] = {}
        for name, (delta, index) in (bands or {}).items():
            param = self._param(name, delta.shape, "the delta")
            self._bands[name] = (
                delta.to(param.device, torch.float32),
                None if index is None else index.to(param.device),
                (delta_dtypes or {}).get(name, torch.float32),
            )

    def _param(self, name: str, shape, source) -> torch.nn.Parameter:
        if name not in self._params:
            raise DppaError(
                f"{source}: tensor {name!r} is not a parameter of the model; was it made from this model's base?"
            )
        param = self._params[name]
        if tuple(param.shape) != tuple(shape):
            raise DppaError(
                f"{source}: tensor {name!r} has shape {list(shape)} but the model's parameter has {list(param.shape)}"
            )
        return param

    @torch.no_grad()
    def _set(self, name: str, value: torch.Tensor, source, *, add_base: bool) -> None:
        """Parameter ``name`` := base + value (``value``, a float32 tensor this call may overwrite) or value."""
        param = self._param(name, value.shape, source)
        base = self._base.setdefault(name, param.detach().clone())
        value = value.to(param.device, torch.float32)
        param.copy_(value.add_(base) if add_base else value)

    @torch.no_grad()
    def amplify(self, factors: Sequence[float]) -> None:
        """Make the model base + amplified delta for ``factors`` (one per band), whatever it held before."""
        factors = [float(f) for f in factors]
        if len(factors) != self.n_bands:
            raise DppaError(f"{len(factors)} factors for {self.n_bands} bands; give one factor per band")
        if any(f < 0 for f in factors):
            raise DppaError(f"factors {factors}: must be >= 0")
        self.restore(keep=self._bands)
        for name, (delta, index, stored_dtype) in self._bands.items():
            amplified = amplify_tensor(delta, index, factors, self.combine)
            if stored_dtype != torch.float32:
                amplified = amplified.to(stored_dtype).float()  # the folder route stores it in the delta's dtype
            self._set(name, amplified, "the delta", add_base=True)
        self.factors = tuple(factors)

    def add_delta(self, folder: str | os.PathLike, scale: float = 1.0) -> None:
        """Make the model base + scale x the delta folder's tensors (read one by one)."""
        self.restore()
        with open_checkpoint(folder) as reader:
            for name in reader.names():
                self._param(name, reader.shape(name), folder)  # check every tensor before changing any
            for name in reader.names():
                self._set(name, reader.get(name, dtype=torch.float32) * scale, folder, add_base=True)

    def towards(self, folder: str | os.PathLike, scale: float) -> None:
        """Make the model base + scale x (the model folder's weights - base): for a merge written at scale 1, the
        same merge at scale `scale` (both merge methods are base + scale x combined deltas, docs/method.md)."""
        self.restore()
        with open_checkpoint(folder) as reader:
            for name in reader.names():
                self._param(name, reader.shape(name), folder)
            for name in reader.names():
                param = self._params[name]
                base = self._base.setdefault(name, param.detach().clone()).float()
                target = reader.get(name, dtype=torch.float32).to(param.device)
                self._set(name, torch.lerp(base, target, scale), folder, add_base=False)

    def load_weights(self, folder: str | os.PathLike) -> None:
        """Make the model hold the model folder's weights (same architecture), read tensor by tensor."""
        self.restore()
        with open_checkpoint(folder) as reader:
            for name in reader.names():
                self._param(name, reader.shape(name), folder)
            for name in reader.names():
                self._set(name, reader.get(name, dtype=torch.float32), folder, add_base=False)

    @torch.no_grad()
    def restore(self, keep=()) -> None:
        """Put the base weights back (except in ``keep``: parameters the caller sets next anyway)."""
        for name, base in self._base.items():
            if name not in keep:
                self._params[name].copy_(base)
        self.factors = None

    @contextmanager
    def candidate(self, factors: Sequence[float]) -> Iterator[torch.nn.Module]:
        """``with weights.candidate(f) as model: evaluate(model)``; the base is back afterwards, even on error."""
        self.amplify(factors)
        try:
            yield self.model
        finally:
            self.restore()


def candidates_for_delta(
    model: torch.nn.Module,
    delta: str | os.PathLike,
    densities: Sequence[float],
    *,
    combine: str = "max",
    device: str = "cpu",
    options=None,
    scope: str = DEFAULT_SCOPE,
) -> CandidateWeights:
    """CandidateWeights for the delta folder ``delta`` split into bands at ``densities`` (DP options as amplify)."""
    bands, _ = compute_bands(delta, list(densities), device=device, options=options, scope=scope)
    reader = open_checkpoint(delta)
    return CandidateWeights(model, bands, len(densities), combine, {name: reader.dtype(name) for name in bands})
