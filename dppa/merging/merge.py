"""Merging deltas into the base with any method of `MERGERS`, streamed chunk by chunk (docs/method.md).

Per tensor, TIES's trim threshold of each unpruned delta is found first (one tensor in memory at a time); then the
tensor is combined in chunks of a few million elements, reading the same range of the base and of every delta, so
memory does not grow with the number of fine-tunes or the size of the model.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from dppa.compute import PARALLEL_CHUNK_ELEMS, Progress, chunk_ranges, chunk_workers, ordered_map, resolve_device
from dppa.errors import DppaError
from dppa.extract import check_same_architecture
from dppa.io.atomic import atomic_dir, check_output_free
from dppa.io.manifest import check_is_delta, read_manifest, source_record, write_manifest
from dppa.io.model_files import copy_model_files
from dppa.io.reader import CheckpointReader, open_checkpoint
from dppa.io.writer import ContentHasher, ShardedWriter, parse_size, tensor_bytes
from dppa.merging.registry import MERGERS
from dppa.merging.ties import trim_threshold
from dppa.sparsify.threshold import magnitude_keys

THRESHOLD_CHUNK_ELEMS = 1 << 20


def _open_deltas(base: CheckpointReader, paths: list) -> list[CheckpointReader]:
    readers = []
    base_names = set(base.names())
    for path in paths:
        reader = open_checkpoint(path)
        check_is_delta(reader.folder)
        check_same_architecture(base, reader)
        names = set(reader.names())
        for name in sorted(base_names - names):
            raise DppaError(
                f"{reader.folder}: delta has no tensor {name!r} of the base; was it extracted from this base?"
            )
        for name in sorted(names - base_names):
            raise DppaError(
                f"{reader.folder}: tensor {name!r} is not in the base ({base.folder}); was it extracted from this base?"
            )
        for name in names:
            if reader.shape(name) != base.shape(name):
                raise DppaError(
                    f"{reader.info(name).file}: tensor {name!r} has shape {list(reader.shape(name))} "
                    f"but the base has {list(base.shape(name))}"
                )
        readers.append(reader)
    return readers


def merge_deltas(
    base: str | os.PathLike,
    deltas: list,
    out: str | os.PathLike,
    *,
    method: str = "ties",
    weights: list[float] | None = None,
    scale: float = 1.0,
    options: Any = None,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
    max_shard_size: str = "5GB",
    chunk_elems: int = PARALLEL_CHUNK_ELEMS,
) -> Path:
    """Merge delta folders into `base` and write a model folder at `out`; returns `out`.

    `options`: the method's options dataclass, a dict of its option values, or None for its defaults.
    """
    options = MERGERS.options_for(method, options)
    merger = MERGERS.get(method).impl(options)
    density = merger.trim_density
    if not deltas:
        raise DppaError("give at least one delta folder to merge")
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    if len(weights) != len(deltas):
        raise DppaError(f"--weights: {len(weights)} weights for {len(deltas)} deltas; give one weight per delta")
    out = Path(out)
    check_output_free(out, overwrite)
    dev = resolve_device(device)
    base_r = open_checkpoint(base, allow_pickle)
    readers = _open_deltas(base_r, deltas)
    trim = [density is not None and density < 1.0 and not read_manifest(r.folder).get("pruned") for r in readers]
    names = base_r.names()
    plan = [(n, base_r.dtype(n), base_r.shape(n)) for n in names]
    total_bytes = base_r.total_bytes() + sum(r.total_bytes() * (1 + t) for r, t in zip(readers, trim))
    base_hash = ContentHasher()
    with (
        atomic_dir(out, overwrite) as tmp,
        Progress(f"merge {method}", total_bytes, len(names), progress) as bar,
        chunk_workers() as (pool, workers),
    ):
        writer = ShardedWriter(tmp, plan, parse_size(max_shard_size))
        for name in names:
            pending = [
                pool.submit(trim_threshold, r, name, density, THRESHOLD_CHUNK_ELEMS) if t else None
                for r, t in zip(readers, trim)
            ]
            thresholds = [p.result() if p else None for p in pending]
            bar.advance(sum(r.info(name).nbytes for r, t in zip(readers, trim) if t))
            base_hash.start(name, base_r.dtype(name), base_r.shape(name))

            def merged_chunk(span: tuple[int, int], name=name, thresholds=thresholds):
                start, count = span
                raw_base = base_r.read_flat(name, start, count)
                deltas = []
                for reader, threshold in zip(readers, thresholds):
                    raw = reader.read_flat(name, start, count)
                    values = raw.to(dev, torch.float32)
                    if threshold is not None:
                        values.mul_(threshold.mask(magnitude_keys(raw), start).to(dev))
                    deltas.append(values)
                # copy: merge_chunk works in place and raw_base (the same tensor for float32 on CPU) is hashed below
                merged = merger.combine(raw_base.to(dev, torch.float32, copy=True), deltas, weights, scale)
                return raw_base, merged.to(base_r.dtype(name)).cpu()

            spans = chunk_ranges(base_r.numel(name), chunk_elems)
            for raw_base, merged in ordered_map(pool, workers, merged_chunk, spans):
                base_hash.update(tensor_bytes(raw_base))
                writer.write(name, merged)
                bar.advance(raw_base.numel() * (raw_base.element_size() + sum(r.dtype(name).itemsize for r in readers)))
            bar.tensor_done()
        content_hash = writer.close()
        copy_model_files(base_r.folder, tmp)
        write_manifest(
            tmp,
            {
                "kind": "model",
                "content_hash": content_hash,
                "method": method,
                "weights": weights,
                "scale": scale,
                **dataclasses.asdict(options),
                "trimmed": trim,
                "base": source_record(base_r.folder, base_hash.hexdigest()),
                "deltas": [source_record(r.folder, read_manifest(r.folder).get("content_hash", "")) for r in readers],
            },
        )
    return out


def apply_delta(
    base: str | os.PathLike, delta: str | os.PathLike, out: str | os.PathLike, *, scale: float = 1.0, **kwargs
) -> Path:
    """base + scale * delta, written as a model folder."""
    return merge_deltas(base, [delta], out, method="task_arithmetic", scale=scale, **kwargs)
