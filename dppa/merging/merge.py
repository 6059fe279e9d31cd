"""Merging deltas into the base with any method of `MERGERS`, streamed chunk by chunk (docs/method.md).

The inputs are either delta folders (extract / prune / amplify outputs) or fine-tuned model folders; the manifest
decides which (`dppa.io.manifest.input_kind`), and one merge takes one kind only. A model folder's delta is taken
on the fly, chunk by chunk, exactly as `dppa extract` would store it: fine-tune minus base in float32, rounded to
the fine-tune's dtype. So merging model folders writes the same bytes as extracting them and merging the deltas,
without reading the base three times or writing and reading back two full deltas.

Per tensor, TIES's trim threshold of each unpruned delta is found first (one tensor at a time, from magnitude keys
streamed in chunks); then the tensor is combined in chunks of a few million elements, reading the same range of
the base and of every input, so memory does not grow with the number of fine-tunes or the size of the model.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dppa.compute import PARALLEL_CHUNK_ELEMS, chunk_ranges, resolve_device
from dppa.errors import DppaError
from dppa.extract import check_finite, check_same_architecture, check_same_tensors, matching_rows
from dppa.io.adapter import open_finetune, provenance
from dppa.io.atomic import check_output_free
from dppa.io.codec import delta_histogram15, delta_ties, trimmed_deltas
from dppa.io.content_hash import tensor_bytes, tensor_digest
from dppa.io.fingerprint import base_fingerprint
from dppa.io.manifest import check_is_delta, input_kind, source_record, write_manifest
from dppa.io.model_files import copy_model_files
from dppa.io.reader import CheckpointReader, open_checkpoint
from dppa.io.stream import Stream, StreamInput
from dppa.io.writer import ShardedWriter, parse_size
from dppa.merging.card import write_card_and_recipe
from dppa.merging.registry import MERGERS
from dppa.merging.ties import trim_threshold
from dppa.sparsify.threshold import KEEP_ALL, CountedChunks, key_bits, magnitude_keys

THRESHOLD_CHUNK_ELEMS = 1 << 20


class MergeInput:
    """One input of a merge: a delta folder, or a fine-tuned model folder whose delta is computed on the fly."""

    def __init__(self, reader: CheckpointReader, is_model: bool, manifest: dict, base: CheckpointReader, dev):
        self.reader, self.is_model, self.manifest, self.base, self.dev = reader, is_model, manifest, base, dev
        self.stream_input = StreamInput(reader, hashed=is_model)  # a model's content hash, for the manifest

    @property
    def pruned(self) -> bool:
        return bool(self.manifest.get("pruned")) and not self.is_model

    def delta_dtype(self, name: str) -> torch.dtype:
        return self.reader.dtype(name)

    def delta(self, name: str, start: int, count: int, raw_base: torch.Tensor | None = None):
        """(raw chunk read from this input, delta chunk in `delta_dtype` on the compute device).

        For a model folder, `raw_base` is the base's chunk as read (read here when not given)."""
        raw = self.reader.read_flat(name, start, count)
        if not self.is_model:
            return raw, raw.to(self.dev)
        if raw_base is None:
            raw_base = self.base.read_flat(name, start, count)
        if raw_base.dtype == raw.dtype:
            # torch computes a bf16 / fp16 difference in float32 and rounds it once: the same bits as below
            return raw, raw.to(self.dev).sub(raw_base.to(self.dev))
        return raw, raw.to(self.dev, torch.float32).sub(raw_base.to(self.dev, torch.float32)).to(raw.dtype)

    def fused(self, name: str) -> bool:
        """Whether the delta of `name` is taken by the compiled bf16 kernels (dppa/io/_codec.c): the same bits as
        `delta` and `Threshold.keep_in_`, in one pass over the inputs with no temporaries (about 4x faster)."""
        return (
            trimmed_deltas is not None
            and self.dev.type == "cpu"
            and self.reader.dtype(name) == torch.bfloat16
            and (not self.is_model or self.base.dtype(name) == torch.bfloat16)
        )

    def trimmed(self, name: str, start: int, count: int, raw_base: torch.Tensor, threshold):
        """(raw chunk read from this input, its delta chunk in float32 with what `threshold` drops zeroed: None
        drops nothing) on the compute device."""
        raw, delta = self.delta(name, start, count, raw_base)
        values = delta.to(torch.float32)
        if threshold is not None:  # keys first: `values` may be `delta` itself
            threshold.keep_in_(values, magnitude_keys(delta), start)
        return raw, values

    def trimmed_bits(self, name: str, start: int, count: int, base_bits, threshold):
        """`trimmed` by the compiled kernel, where `fused(name)`: the raw chunk as bf16 bits (a view of the file
        where it can be), and the same float32 values; `base_bits`: the base's chunk as bits."""
        raw = _raw_bits(self.reader, name, start, count)
        keep = threshold or KEEP_ALL
        values = torch.empty(count, dtype=torch.float32)
        trimmed_deltas(raw, base_bits if self.is_model else None, keep.key, keep.tie_cutoff - start, values.numpy())
        return raw, values

    def key_chunks(self, name: str, chunk_elems: int, base_input: StreamInput | None = None, digests=None):
        """The delta's magnitude keys chunk by chunk, for `find_threshold`: a factory of all chunks in order, a
        function returning the i-th one, and, when the compiled kernels take this delta, their `CountedChunks`.

        Their histogram pass reads this model and the base once, in order: given `digests`, it takes this model's
        digest of `name` (and the base's, given `base_input`) on the way, into `digests` ({stream input: hex
        digest}) when the pass is complete, so that the thread streaming the output need not hash them."""
        spans = chunk_ranges(self.base.numel(name), chunk_elems)

        def chunk_at(i: int) -> torch.Tensor:
            return magnitude_keys(self.delta(name, *spans[i])[1])

        def bits_at(i: int):
            return _raw_bits(self.reader, name, *spans[i]), _raw_bits(self.base, name, *spans[i])

        def histograms():
            hist = torch.empty(1 << 16, dtype=torch.int64)  # one for every chunk: `find_threshold` adds it up
            own = tensor_digest(name, self.reader.dtype(name), self.reader.shape(name)) if digests is not None else None
            base_digest = tensor_digest(name, self.base.dtype(name), self.base.shape(name)) if base_input else None
            for i, (_, count) in enumerate(spans):
                raw, raw_base = bits_at(i)
                if own is not None:
                    own.update(tensor_bytes(raw))
                if base_digest is not None:
                    base_digest.update(tensor_bytes(raw_base))
                delta_histogram15(raw, raw_base, hist.zero_().numpy())
                yield count, hist
            if digests is not None:
                self.stream_input.finish(name, self.base.numel(name), chunk_elems, own)  # a grown vocabulary's rows
                digests[self.stream_input] = own.hexdigest()
                if base_digest is not None:
                    digests[base_input] = base_digest.hexdigest()

        def ties(i: int, key: int, nth: int) -> tuple[int, int]:
            return delta_ties(*bits_at(i), key, nth)

        counted = CountedChunks(histograms, ties) if self.is_model and self.fused(name) else None
        return lambda: map(chunk_at, range(len(spans))), chunk_at, counted

    def record(self) -> dict:
        if self.is_model:
            return {**source_record(self.reader.folder, self.stream_input.hexdigest()), **provenance(self.reader)}
        return source_record(self.reader.folder, self.manifest.get("content_hash", ""))


def _check_delta_matches_base(base: CheckpointReader, reader: CheckpointReader) -> None:
    check_same_tensors(base, reader, "was the delta extracted from this base?")
    names = reader.names()
    for name in names:
        if reader.shape(name) != base.shape(name):
            raise DppaError(
                f"{reader.info(name).file}: tensor {name!r} has shape {list(reader.shape(name))} "
                f"but the base has {list(base.shape(name))}"
            )


def _base_mismatch(source: MergeInput, base: CheckpointReader, fingerprint: str, content_hash: str | None) -> str:
    """Why the delta `source` was not extracted from `base` (a sentence), or '' when its record agrees (or it has
    none: deltas written before bases were recorded). `content_hash` None: only the fingerprint is known yet."""
    recorded = source.manifest.get("base") or {}
    if recorded.get("fingerprint") and recorded["fingerprint"] != fingerprint:
        mismatch = f"fingerprint {recorded['fingerprint'][4:16]}, this base's {fingerprint[4:16]}"
    elif content_hash is not None and recorded.get("content_hash") and recorded["content_hash"] != content_hash:
        mismatch = f"content hash {recorded['content_hash'][:12]}, this base's {content_hash[:12]}"
    else:
        return ""
    origin = recorded.get("hub_id") or recorded.get("path", "?")
    return f"{source.reader.folder}: was extracted from the base {origin} ({mismatch}), not from {base.folder}"


def check_bases(
    inputs: list[MergeInput],
    base: CheckpointReader,
    fingerprint: str,
    content_hash=None,
    allow_other_base: bool = False,
) -> list[str]:
    """Refuse deltas extracted from another base (unless `allow_other_base`); returns the paths that were."""
    other = [(s, why) for s in inputs if not s.is_model and (why := _base_mismatch(s, base, fingerprint, content_hash))]
    if other and not allow_other_base:
        raise DppaError(
            f"{other[0][1]}; merge it onto its own base, or pass --allow-other-base (params: merge.allow_other_base) "
            "to move the task vector onto this one deliberately"
        )
    return [str(s.reader.folder) for s, _ in other]


def open_inputs(base: CheckpointReader, paths: list, dev, *, models: bool, allow_pickle: bool) -> list[MergeInput]:
    """Delta folders, or (with `models`) fine-tuned model folders: all of one kind, as their manifests say."""
    kinds = [(path, *input_kind(path)) if models else (path, "delta", check_is_delta(path)) for path in paths]
    found = {kind for _, kind, _ in kinds}
    if len(found) > 1:
        deltas = ", ".join(str(p) for p, k, _ in kinds if k == "delta")
        model_folders = ", ".join(str(p) for p, k, _ in kinds if k == "model")
        raise DppaError(
            f"inputs mix delta folders ({deltas}) and model folders ({model_folders}); give only deltas, "
            "or only fine-tuned model folders"
        )
    inputs = []
    for path, kind, manifest in kinds:
        # a fine-tuned model folder, or a LoRA adapter read as the model it describes on this base
        reader = open_finetune(path, base, allow_pickle) if kind == "model" else open_checkpoint(path)
        check_same_architecture(base, reader)
        if kind == "model":
            check_same_tensors(base, reader)
            for name in base.names():
                matching_rows(base, reader, name)  # equal shapes, or a grown vocabulary (its added rows are dropped)
        else:
            _check_delta_matches_base(base, reader)
        inputs.append(MergeInput(reader, kind == "model", manifest, base, dev))
    return inputs


def _bits(chunk: torch.Tensor):
    """A bf16 chunk's bits, as the compiled kernels take them."""
    return chunk.view(torch.int16).numpy()


def _raw_bits(reader: CheckpointReader, name: str, start: int, count: int):
    """A bf16 chunk's bits in the file's own pages where the reader can map them (no copy), else read."""
    view = reader.bits_view(name, start, count)
    return view if view is not None else _bits(reader.read_flat(name, start, count))


def _tensor(raw) -> torch.Tensor:
    """A raw chunk as a tensor: bits (a bf16 chunk, see `_raw_bits`) copied, a tensor as it is."""
    return torch.from_numpy(raw.copy()).view(torch.bfloat16) if isinstance(raw, np.ndarray) else raw


def _trim_threshold(source: MergeInput, name: str, density: float, hashed: bool, base_input: StreamInput | None):
    """(TIES's trim threshold of `name` for `source`, {stream input: digest of `name`} that its pass took when
    `hashed`, with the base's when given `base_input`)."""
    digests = {} if hashed else None
    chunks, chunk_at, counted = source.key_chunks(name, THRESHOLD_CHUNK_ELEMS, base_input, digests)
    numel, bits = source.base.numel(name), key_bits(source.delta_dtype(name))
    return trim_threshold(chunks, numel, density, bits, chunk_at, counted), digests


def _all_finite(merged: torch.Tensor) -> bool:
    low, high = torch.aminmax(merged)  # NaN propagates; both finite exactly when every entry is
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _refuse_non_finite(raw_base, raws, name, base_r, inputs) -> None:
    """A model input's NaN / Inf (or a difference that overflows) shows in the merged chunk; name its source."""
    check_finite(raw_base.float(), base_r, name)
    for raw, source in zip(raws, inputs):
        check_finite(raw.float(), source.reader, name)
    raise DppaError(f"tensor {name!r}: the merge overflows its float range; a fine-tune is corrupt or diverged")


def _merged_chunks(base_r: CheckpointReader, inputs: list[MergeInput], name: str, thresholds, merger, weights, scale):
    """The chunk function of tensor `name`: ([raw base chunk, raw chunk of each input], merged chunk in the base's
    dtype, None)."""
    dev = inputs[0].dev
    any_model = any(source.is_model for source in inputs)
    bf16_cpu = dev.type == "cpu" and base_r.dtype(name) == torch.bfloat16
    fused_inputs = bf16_cpu and all(source.fused(name) for source in inputs)  # raw chunks as bits, no copies
    fused_combine = bf16_cpu and merger.combine_bf16 is not None

    def merged_chunk(span: tuple[int, int]):
        start, count = span
        if fused_inputs:
            raw_base = _raw_bits(base_r, name, start, count)
            pairs = [s.trimmed_bits(name, start, count, raw_base, t) for s, t in zip(inputs, thresholds)]
        else:
            raw_base = base_r.read_flat(name, start, count)
            pairs = [s.trimmed(name, start, count, raw_base, t) for s, t in zip(inputs, thresholds)]
        raws, deltas = [raw for raw, _ in pairs], [values for _, values in pairs]
        if fused_combine:
            merged = torch.empty(count, dtype=torch.bfloat16)
            base_bits = raw_base if fused_inputs else _bits(raw_base)
            finite = merger.combine_bf16(base_bits, deltas, weights, scale, _bits(merged))
        else:
            # a copy: merge methods work in place, and raw_base (the same tensor for float32 on the CPU) is hashed
            merged = merger.combine(_tensor(raw_base).to(dev, torch.float32, copy=True), deltas, weights, scale)
            finite = not any_model or _all_finite(merged)
            merged = merged.to(base_r.dtype(name)).cpu()
        if any_model and not finite:
            _refuse_non_finite(_tensor(raw_base), [_tensor(raw) for raw in raws], name, base_r, inputs)
        return [raw_base, *raws], merged, None

    return merged_chunk


class _TrimThresholds:
    """TIES's trim thresholds of each tensor, for each input to trim (None for the others), found in the pool.

    `submit(i)` queues tensor i's; the merge does so for the next tensor once the current one's first chunk is in,
    so the workers find the next thresholds while the caller's thread hashes and writes this tensor's chunks, and
    the caller does not wait for them before this tensor's first chunk. With more than one worker, a threshold's
    pass also hashes what it reads (the first one the base too), and those digests are recorded, not taken again:
    hashing the inputs on the caller's thread made it the bottleneck (0.6 of its 0.75 CPU seconds merging two
    SmolLM2-135M fine-tunes). With one worker the caller's thread hashes them, as it would otherwise wait."""

    def __init__(self, stream: Stream, inputs, trim: list[bool], names: list[str], density, base_input: StreamInput):
        self._stream, self._inputs, self._trim, self._names, self._density = stream, inputs, trim, names, density
        self._hashed = stream.workers > 1
        first = next((j for j, s in enumerate(inputs) if trim[j] and s.is_model), None) if self._hashed else None
        self._base_inputs = [base_input if j == first else None for j in range(len(inputs))]  # who hashes the base
        self._pending: dict[int, list] = {}

    def submit(self, i: int) -> None:
        if i >= len(self._names) or i in self._pending:
            return
        pool, name = self._stream.pool, self._names[i]
        self._pending[i] = [
            pool.submit(_trim_threshold, s, name, self._density, self._hashed, base) if t else None
            for s, t, base in zip(self._inputs, self._trim, self._base_inputs)
        ]

    def take(self, i: int) -> list:
        """Tensor i's thresholds (submitted now if they were not), its digests recorded."""
        self.submit(i)
        name = self._names[i]
        found = [p.result() if p else (None, None) for p in self._pending.pop(i)]
        for _, digests in found:
            for stream_input, digest in (digests or {}).items():
                stream_input.record(name, digest)
        base_bytes = self._inputs[0].base.info(name).nbytes
        trimmed = [s for s, t in zip(self._inputs, self._trim) if t]
        self._stream.bar.advance(sum(s.reader.info(name).nbytes + base_bytes * s.is_model for s in trimmed))
        return [threshold for threshold, _ in found]


def merge_deltas(
    base: str | os.PathLike,
    deltas: list,
    out: str | os.PathLike,
    *,
    method: str = "ties",
    weights: list[float] | None = None,
    scale: float = 1.0,
    options: Any = None,
    models: bool = False,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
    max_shard_size: str = "5GB",
    chunk_elems: int = PARALLEL_CHUNK_ELEMS,
    allow_other_base: bool = False,
) -> Path:
    """Merge delta folders into `base` and write a model folder at `out`; returns `out`.

    `models`: also accept fine-tuned model folders in `deltas` (all inputs of one kind; each delta taken on the
    fly as `dppa extract` stores it). `options`: the method's options dataclass, a dict of its option values, or
    None for its defaults. `allow_other_base`: accept deltas whose recorded base is not `base` (a deliberate transfer,
    recorded in the output's manifest as `other_base`); refused otherwise, before any work by the fingerprint and
    before the output is renamed into place by the full content hash.
    """
    options = MERGERS.options_for(method, options)
    merger = MERGERS.get(method).impl(options)
    if not deltas:
        raise DppaError("give at least one delta folder to merge")
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    if len(weights) != len(deltas):
        raise DppaError(f"--weights: {len(weights)} weights for {len(deltas)} inputs; give one weight per input")
    out = Path(out)
    check_output_free(out, overwrite)
    base_r = open_checkpoint(base, allow_pickle)
    inputs = open_inputs(base_r, deltas, resolve_device(device), models=models, allow_pickle=allow_pickle)
    fingerprint = base_fingerprint(base_r)
    other_base = check_bases(inputs, base_r, fingerprint, allow_other_base=allow_other_base)
    density = merger.trim_density
    trim = [density is not None and density < 1.0 and not source.pruned for source in inputs]
    names = base_r.names()
    base_bytes = base_r.total_bytes()
    base_input = StreamInput(base_r)
    streamed = [base_input, *(s.stream_input for s in inputs)]
    with Stream(
        out,
        desc=f"merge {method}",
        total_bytes=base_bytes
        + sum(s.reader.total_bytes() * (1 + t) + base_bytes * t * s.is_model for s, t in zip(inputs, trim)),
        tensors=len(names),
        overwrite=overwrite,
        needed_bytes=base_bytes,  # the merged model has the base's tensors
        progress=progress,
    ) as stream:
        plan = [(n, base_r.dtype(n), base_r.shape(n)) for n in names]
        stream.writer = ShardedWriter(stream.tmp, plan, parse_size(max_shard_size))
        trim_thresholds = _TrimThresholds(stream, inputs, trim, names, density, base_input)
        for i, name in enumerate(names):
            chunk_fn = _merged_chunks(base_r, inputs, name, trim_thresholds.take(i), merger, weights, scale)
            spans = chunk_ranges(base_r.numel(name), chunk_elems)
            stream.chunks(
                name, spans, chunk_fn, streamed, chunk_elems, on_first=lambda i=i: trim_thresholds.submit(i + 1)
            )
        content_hash = stream.writer.close()
        other_base = check_bases(inputs, base_r, fingerprint, base_input.hexdigest(), allow_other_base) or other_base
        copy_model_files(base_r.folder, stream.tmp)
        manifest = {
            "kind": "model",
            "content_hash": content_hash,
            "method": method,
            "weights": weights,
            "scale": scale,
            **dataclasses.asdict(options),
            "trimmed": trim,
            "base": source_record(base_r.folder, base_input.hexdigest()),
            ("finetuned" if any(s.is_model for s in inputs) else "deltas"): [s.record() for s in inputs],
            **({"other_base": other_base} if other_base else {}),
        }
        write_manifest(stream.tmp, manifest)
        recipe_options = dataclasses.asdict(options)
        write_card_and_recipe(stream.tmp, out.name, manifest, recipe_options, deltas, base_r.folder, models)
    return out


def apply_delta(
    base: str | os.PathLike, delta: str | os.PathLike, out: str | os.PathLike, *, scale: float = 1.0, **kwargs
) -> Path:
    """base + scale * delta, written as a model folder."""
    return merge_deltas(base, [delta], out, method="task_arithmetic", scale=scale, **kwargs)
