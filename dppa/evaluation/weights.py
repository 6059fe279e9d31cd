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
from dppa.sparsify.bands import band_factors, compute_bands
from dppa.sparsify.scope import DEFAULT_SCOPE

# name -> (delta in float32, uint8 band index with 0 = pruned and b = band b, or None when out of scope)
Bands = Mapping[str, "tuple[torch.Tensor, torch.Tensor | None]"]
CHUNK = 1 << 22  # elements a candidate is built in at a time: bounds its scratch memory (12 bytes an element)


class CandidateWeights:
    """Sets ``model``'s parameters to base + something, in place, and restores the base.

    - ``amplify(factors)``: base + the amplified delta of ``bands`` (as ``dppa.sparsify.bands.compute_bands`` gives
      them; ``delta_dtypes``: the delta folder's stored dtypes, float32 when omitted);
    - ``add_delta(folder, scale)``: base + scale x a delta folder's tensors;
    - ``load_weights(folder)``: a model folder's weights (a fine-tune of the same architecture).

    Each call starts from the base, so candidates never accumulate. ``model`` must hold the base weights when this
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
    ):
        band_factors([1.0], combine)  # validates `combine`
        self.model = model
        self.n_bands = n_bands
        self.combine = combine
        self.factors: tuple[float, ...] | None = None  # the amplified candidate the model holds now, if any
        self._params = dict(model.named_parameters(remove_duplicate=False))
        self._base: dict[str, torch.Tensor] = {}
        entries = []
        for name in list(bands or {}):
            delta, index = bands.pop(name) if isinstance(bands, dict) else bands[name]
            entries.append((name, self._param(name, delta.shape, "the delta"), delta, index))
        self._bands = {name for name, *_ in entries}
        self._flat = _FlatBands(entries, n_bands, delta_dtypes or {}) if entries else None
        if self._flat is not None:
            self._base.update(self._flat.base_views())

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
        if self._flat is not None:
            # amplify_tensor's factors: 0 for pruned entries, each band's factor, the largest for out-of-scope tensors
            self._flat.build([0.0, *band_factors(factors, self.combine), max(factors)])
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


class _FlatBands:
    """The band deltas of one model side by side in flat buffers, so that a candidate is a few operations over all
    of them (a small model has many small tensors, and per-tensor operations cost more than their arithmetic).

    Per element, ``build`` computes what ``amplify_tensor`` then the folder route compute: factor[band index] x
    delta in float32, rounded through the delta folder's stored dtype where it is not float32, plus the base in
    float32, rounded to the parameter's dtype. The base is kept in the parameters' dtype (float32 when they differ,
    which holds any of them exactly). Where the parameters share one dtype, they are moved into one flat buffer as
    well (each parameter then views its part of it), and a float32 model's candidate is computed straight into its
    parameters. Work goes a chunk (``CHUNK`` elements) at a time, so scratch memory is bounded.
    """

    def __init__(self, entries: list, n_bands: int, stored_dtypes: Mapping[str, torch.dtype]):
        params = [param for _, param, _, _ in entries]
        device = params[0].device
        if any(param.device != device for param in params):
            raise DppaError("the model's parameters are on several devices; load it on one device for the search")
        dtypes = {param.dtype for param in params}
        total = sum(param.numel() for param in params)
        self.device = device
        self.delta = torch.empty(total, dtype=torch.float32, device=device)
        self.index = torch.empty(total, dtype=torch.uint8, device=device)  # n_bands + 1: out of scope
        self.base = torch.empty(total, dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32, device=device)
        # one buffer for the parameters, unless they differ in dtype or one is listed twice (tied weights)
        shared = not dtypes and len({id(p) for p in params}) == len(params)
        self.params = torch.empty(total, dtype=self.base.dtype, device=device) if shared else None
        self.spans: dict[str, tuple[int, int, torch.Size]] = {}
        pieces, rounding = [], []  # (start, end, parameter's flat view); (start, end, stored dtype)
        offset = 0
        for name, param, delta, index in entries:
            end = offset + param.numel()
            self.delta[offset:end].copy_(delta.reshape(-1))
            if index is None:
                self.index[offset:end].fill_(n_bands + 1)
            else:
                self.index[offset:end].copy_(index.reshape(-1))
            self.base[offset:end].copy_(param.detach().reshape(-1))
            self.spans[name] = (offset, end, param.shape)
            if self.params is not None:
                self.params[offset:end].copy_(param.detach().reshape(-1))
                param.data = self.params[offset:end].view(param.shape)
            else:
                pieces.append((offset, end, param.detach().view(-1)))
            stored = stored_dtypes.get(name, torch.float32)
            if stored != torch.float32:
                if rounding and rounding[-1][1] == offset and rounding[-1][2] == stored:
                    rounding[-1] = (rounding[-1][0], end, stored)
                else:
                    rounding.append((offset, end, stored))
            offset = end
        # per chunk: its range, the pieces of parameters it fills and the runs it rounds, relative to the chunk
        self.chunks = []
        for start in range(0, total, CHUNK):
            stop = min(start + CHUNK, total)
            self.chunks.append(
                (
                    start,
                    stop,
                    [(view[max(a, start) - a : min(b, stop) - a], max(a, start) - start, min(b, stop) - start)
                     for a, b, view in pieces if a < stop and b > start],
                    [(max(a, start) - start, min(b, stop) - start, dtype)
                     for a, b, dtype in rounding if a < stop and b > start],
                )
            )  # fmt: skip
        size = min(CHUNK, total)
        # band indices as int32 (the index type index_select reads fastest); kept for good when one chunk holds all
        self._positions = torch.empty(size, dtype=torch.int32, device=device)
        self._fixed_positions = len(self.chunks) == 1
        if self._fixed_positions:
            self._positions.copy_(self.index)
        self._direct = self.params is not None and self.params.dtype == torch.float32
        self._values = None if self._direct else torch.empty(size, dtype=torch.float32, device=device)

    def base_views(self) -> dict[str, torch.Tensor]:
        """Each parameter's base, as views of the flat base."""
        return {name: self.base[a:b].view(shape) for name, (a, b, shape) in self.spans.items()}

    @torch.no_grad()
    def build(self, table: list[float]) -> None:
        """Every parameter := base + table[band index] x delta (see the class)."""
        table = torch.tensor(table, dtype=torch.float32, device=self.device)
        for start, stop, pieces, rounding in self.chunks:
            positions = self._positions[: stop - start]
            if not self._fixed_positions:
                positions.copy_(self.index[start:stop])
            values = self.params[start:stop] if self._direct else self._values[: stop - start]
            torch.index_select(table, 0, positions, out=values)
            values.mul_(self.delta[start:stop])
            for a, b, dtype in rounding:
                values[a:b].copy_(values[a:b].to(dtype))
            values.add_(self.base[start:stop])
            if self.params is not None and not self._direct:
                self.params[start:stop].copy_(values)
            for view, a, b in pieces:
                view.copy_(values[a:b])


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
