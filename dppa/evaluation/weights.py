"""Candidates built in memory: a loaded base model's weights set in place, and the base put back.

The factor search evaluates many factor vectors for one fine-tune, and evaluation in memory scores base + delta
without writing a model. Writing each candidate to disk (amplify, then apply) costs two full model writes per step;
here the model is loaded once and each candidate is a few tensor operations over all its band parameters, with the
same arithmetic as the folder route (``dppa amplify`` then ``dppa apply``: float32 sums rounded to the model's
dtype), so scores match it.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from dppa.errors import DppaError
from dppa.io.reader import open_checkpoint
from dppa.sparsify.bands import band_factors, compute_bands
from dppa.sparsify.scope import DEFAULT_SCOPE

# name -> (delta in float32, uint8 band index with 0 = pruned and b = band b, or None when out of scope)
Bands = Mapping[str, "tuple[torch.Tensor, torch.Tensor | None]"]


class CandidateWeights:
    """Sets ``model``'s parameters to base + something, in place, and restores the base.

    - ``amplify(factors)``: base + the amplified delta of ``bands`` (as ``dppa.sparsify.bands.compute_bands`` gives
      them; ``delta_dtypes``: the delta folder's stored dtypes, float32 when omitted);
    - ``add_delta(folder, scale)``: base + scale x a delta folder's tensors;
    - ``load_weights(folder)``: a model folder's weights (a fine-tune of the same architecture).

    Each call starts from the base, so candidates never accumulate. Candidates are rounded to each parameter's
    dtype as saved (``saved_dtypes``, by parameter name; default: the dtype it has now), as a folder written with
    them would be, also where the model computes in float32 (dppa.evaluation.harness.to_compute_dtype, which gives
    that mapping). ``model`` must hold the base weights when this
    is made; a parameter's base is copied aside the first time it is touched (memory: one extra copy of the touched
    parameters). The band deltas are moved into flat buffers (``_FlatBands``): a ``bands`` dict is emptied as they
    are, so that the deltas are not held twice.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        bands: Bands | None = None,
        n_bands: int = 0,
        combine: str = "max",
        delta_dtypes: Mapping[str, torch.dtype] | None = None,
        saved_dtypes: Mapping[str, torch.dtype] | None = None,
    ):
        band_factors([1.0], combine)  # validates `combine`
        self.model = model
        self.n_bands = n_bands
        self.combine = combine
        self.factors: tuple[float, ...] | None = None  # the amplified candidate the model holds now, if any
        self._params = dict(model.named_parameters(remove_duplicate=False))
        self._saved = {name: (saved_dtypes or {}).get(name, param.dtype) for name, param in self._params.items()}
        self._base: dict[str, torch.Tensor] = {}
        self._bands = set(bands or {})
        for name in self._bands:
            self._param(name, bands[name][0].shape, "the delta")  # every name checked before any is taken
        # (device, dtype, saved dtype) -> {parameter: entry}; tied names: the last
        groups: dict[tuple, dict[int, tuple]] = {}
        for name in list(bands or {}):
            delta, index = bands.pop(name) if isinstance(bands, dict) else bands[name]
            param = self._params[name]
            stored = (delta_dtypes or {}).get(name, torch.float32)
            key = (param.device, param.dtype, self._saved[name])
            groups.setdefault(key, {})[id(param)] = (name, param, delta, index, stored)
        self._flat = [_FlatBands(list(group.values()), saved) for (_, _, saved), group in groups.items()]
        for flat in self._flat:
            self._base.update(flat.base_views())
        self._pruned_hold_base = True  # band parameters hold the base wherever their band index is 0

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
        self._pruned_hold_base = self._pruned_hold_base and name not in self._bands
        base = self._base.setdefault(name, param.detach().clone())
        value = value.to(param.device, torch.float32)
        value = value.add_(base) if add_base else value
        param.copy_(value if self._saved[name] == param.dtype else value.to(self._saved[name]))

    @torch.no_grad()
    def amplify(self, factors: Sequence[float]) -> None:
        """Make the model base + amplified delta for ``factors`` (one per band), whatever it held before."""
        factors = [float(f) for f in factors]
        if len(factors) != self.n_bands:
            raise DppaError(f"{len(factors)} factors for {self.n_bands} bands; give one factor per band")
        if any(f < 0 for f in factors):
            raise DppaError(f"factors {factors}: must be >= 0")
        self.restore(keep=self._bands if self._pruned_hold_base else ())
        # amplify_tensor's factors by band index: 0 (pruned), each band's factor, the largest (out of scope)
        table = [0.0, *band_factors(factors, self.combine), max(factors)]
        for flat in self._flat:
            flat.build(table)
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
        self._pruned_hold_base = self._pruned_hold_base or not keep
        self.factors = None

    @contextmanager
    def candidate(self, factors: Sequence[float]) -> Iterator[torch.nn.Module]:
        """``with weights.candidate(f) as model: evaluate(model)``; the base is back afterwards, even on error."""
        self.amplify(factors)
        try:
            yield self.model
        finally:
            self.restore()


class _FlatBands:
    """The band parameters of one device, dtype and saved dtype, moved into one flat buffer (each parameter then
    views its part of it), with their deltas laid out so that a candidate is a few operations over all of them: a
    small model has many small tensors, and per-tensor operations cost more than their arithmetic.

    Per element, ``build`` computes what ``amplify_tensor`` then the folder route compute: factor[band index] x
    delta in float32, rounded through the delta folder's stored dtype where it is not float32, plus the base in
    float32, rounded to the parameters' saved dtype (``saved``; they may hold it upcast to float32). Out-of-scope
    tensors (one factor for all) come first, as one dense range. In-scope elements of band 0 (pruned) are base + 0 x
    delta = the base, which the parameters hold between candidates, so they are left alone; the others are kept in
    compact arrays grouped by band and stored dtype (one multiplication per group) with their positions, and
    written with one indexed copy. A base of zero (whose sign 0 x delta could flip) or a non-finite delta (0 x inf
    is NaN) is kept with them, so every element still equals the full computation.
    """

    def __init__(self, entries: list, saved: torch.dtype):
        entries.sort(key=lambda entry: entry[3] is not None)  # out of scope first
        device, dtype = entries[0][1].device, entries[0][1].dtype
        self.saved = saved
        total = sum(entry[1].numel() for entry in entries)
        self.device = device
        self.params = torch.empty(total, dtype=dtype, device=device)
        self.base = torch.empty(total, dtype=dtype, device=device)
        self.spans: dict[str, tuple[int, int, torch.Size]] = {}
        dense, dense_rounding = [], []  # out-of-scope deltas; their (start, end, stored dtype) runs
        kept: dict[tuple[int, torch.dtype], list] = defaultdict(list)  # (band, stored dtype) -> [(positions, deltas)]
        offset = 0
        with torch.no_grad():
            for name, param, delta, index, stored in entries:
                end = offset + param.numel()
                flat_param, flat_delta = param.detach().reshape(-1), delta.reshape(-1).to(device, torch.float32)
                self.params[offset:end].copy_(flat_param)
                self.base[offset:end].copy_(flat_param)
                param.data = self.params[offset:end].view(param.shape)
                self.spans[name] = (offset, end, param.shape)
                if index is None:
                    dense.append(flat_delta)
                    if stored != torch.float32:
                        dense_rounding.append((offset, end, stored))
                else:
                    bands = index.reshape(-1).to(device)
                    keep = (bands != 0) | (flat_param == 0) | ~torch.isfinite(flat_delta)
                    for band in bands[keep].unique().tolist():
                        chosen = keep & (bands == band)
                        kept[band, stored].append((chosen.nonzero().squeeze(1) + offset, flat_delta[chosen]))
                offset = end
        self.dense_end = sum(d.numel() for d in dense)
        self.dense_delta = torch.cat(dense) if dense else None
        self.dense_rounding = dense_rounding
        self.groups: list[tuple[int, int, int, torch.dtype]] = []  # (start, end, band, stored dtype) in kept order
        positions, deltas, start = [], [], 0
        for (band, stored), parts in sorted(kept.items(), key=lambda item: (item[0][0], str(item[0][1]))):
            for where, values in parts:
                positions.append(where)
                deltas.append(values)
            count = sum(where.numel() for where, _ in parts)
            self.groups.append((start, start + count, band, stored))
            start += count
        self.positions = torch.cat(positions) if positions else None
        self.kept_delta = torch.cat(deltas) if deltas else None
        self.kept_base = self.base[self.positions].float() if positions else None
        self._kept_values = torch.empty(start, dtype=torch.float32, device=device)
        self._kept_cast = None if saved == torch.float32 else torch.empty(start, dtype=saved, device=device)
        self._dense_values = None if saved == torch.float32 else torch.empty(self.dense_end, device=device)

    def base_views(self) -> dict[str, torch.Tensor]:
        """Each parameter's base, as views of the flat base."""
        return {name: self.base[a:b].view(shape) for name, (a, b, shape) in self.spans.items()}

    @torch.no_grad()
    def build(self, table: list[float]) -> None:
        """Every parameter := base + table[band index] x delta (see the class); band 0 is left as the base."""
        factors = torch.tensor(table, dtype=torch.float32, device=self.device)
        if self.dense_delta is not None:
            values = self.params[: self.dense_end] if self._dense_values is None else self._dense_values
            torch.mul(self.dense_delta, factors[-1], out=values)
            for a, b, stored in self.dense_rounding:
                values[a:b].copy_(values[a:b].to(stored))
            values.add_(self.base[: self.dense_end])
            if self._dense_values is not None:
                rounded = values if self.params.dtype == self.saved else values.to(self.saved)
                self.params[: self.dense_end].copy_(rounded)
        if self.positions is not None:
            values = self._kept_values
            for a, b, band, stored in self.groups:
                torch.mul(self.kept_delta[a:b], factors[band], out=values[a:b])
                if stored != torch.float32:
                    values[a:b].copy_(values[a:b].to(stored))
            values.add_(self.kept_base)
            if self._kept_cast is not None:
                values = self._kept_cast.copy_(values)
            self.params.index_copy_(0, self.positions, values.to(self.params.dtype))


def candidates_for_delta(
    model: torch.nn.Module,
    delta: str | os.PathLike,
    densities: Sequence[float],
    *,
    combine: str = "max",
    device: str = "cpu",
    options=None,
    scope: str = DEFAULT_SCOPE,
    saved_dtypes: Mapping[str, torch.dtype] | None = None,
) -> CandidateWeights:
    """CandidateWeights for the delta folder ``delta`` split into bands at ``densities`` (DP options as amplify);
    ``saved_dtypes`` as CandidateWeights takes them."""
    bands, _ = compute_bands(delta, list(densities), device=device, options=options, scope=scope)
    reader = open_checkpoint(delta)
    stored = {name: reader.dtype(name) for name in bands}
    return CandidateWeights(model, bands, len(densities), combine, stored, saved_dtypes)
