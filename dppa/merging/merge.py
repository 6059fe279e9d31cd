"""Merging deltas into the base (spec section 4): task arithmetic and TIES, streamed chunk by chunk.

Per tensor, TIES's trim threshold of each unpruned delta is found first (one tensor in memory at a time); then the
tensor is combined in chunks of a few million elements, reading the same range of the base and of every delta, so
memory does not grow with the number of fine-tunes or the size of the model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dppa.extract import check_same_architecture
from dppa.errors import DppaError
from dppa.io.atomic import atomic_dir, check_output_free
from dppa.io.manifest import read_manifest, source_record, write_manifest
from dppa.io.model_files import copy_model_files
from dppa.io.reader import CheckpointReader, open_checkpoint
from dppa.io.writer import ContentHasher, ShardedWriter, parse_size, tensor_bytes
from dppa.compute import PARALLEL_CHUNK_ELEMS, Progress, chunk_ranges, chunk_workers, ordered_map, resolve_device
from dppa.sparsify.threshold import Threshold, find_threshold, key_bits, magnitude_keys
from dppa.sparsify.transform import check_density

METHODS = ("task_arithmetic", "ties")
THRESHOLD_CHUNK_ELEMS = 1 << 20


def ties_trim_count(density: float, numel: int) -> int:
    """Entries kept by TIES's trim: floor(density * n), as in the TIES reference code and mergekit."""
    return max(0, min(numel, int(density * numel)))


def trim_threshold(reader: CheckpointReader, name: str, density: float, chunk_elems: int) -> Threshold:
    """TIES trim threshold of one delta tensor, from histogram passes over chunks read from disk."""
    numel = reader.numel(name)

    def key_chunks():
        return (magnitude_keys(c) for _, c in reader.iter_chunks(name, chunk_elems))
    return find_threshold(key_chunks, numel, ties_trim_count(density, numel), key_bits(reader.dtype(name)))


def ties_combine(weighted: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES on weighted deltas: elect sign(sum), then the weighted mean of the nonzero entries agreeing with it.

    Works in place on `weighted` (temporaries of the caller) and never stacks them, so memory stays at a few
    buffers whatever the number of deltas. An entry agrees when (w_m delta_m) * sign > 0.
    """
    elected = torch.zeros_like(weighted[0])
    for wd in weighted:
        elected.add_(wd)
    elected.sign_()
    total, weight_sum = torch.zeros_like(elected), torch.zeros_like(elected)
    for wd, w in zip(weighted, weights):
        agreeing = wd.mul_(elected).clamp_(min=0)  # |entry| where it agrees with the elected sign, else 0
        total.add_(agreeing)
        weight_sum.add_(agreeing > 0, alpha=w)
    return total.mul_(elected).div_(weight_sum.masked_fill_(weight_sum == 0, 1.0))


def merge_chunk(base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], method: str,
                scale: float) -> torch.Tensor:
    """base + scale * combine(deltas) for one chunk (or whole tensor) in float32; deltas already trimmed.

    Both `base` and `deltas` are consumed (modified in place).
    """
    if method == "task_arithmetic":
        for w, d in zip(weights, deltas):
            base.add_(d, alpha=w * scale)
        return base
    weighted = [d.mul_(w) for d, w in zip(deltas, weights)]
    return base.add_(ties_combine(weighted, weights), alpha=scale)


def _open_deltas(base: CheckpointReader, paths: list) -> list[CheckpointReader]:
    readers = []
    base_names = set(base.names())
    for path in paths:
        reader = open_checkpoint(path)
        kind = read_manifest(reader.folder).get("kind")
        if kind == "model":
            raise DppaError(f"{reader.folder}: is a model, not a delta; run `dppa extract BASE MODEL` to get its delta")
        check_same_architecture(base, reader)
        names = set(reader.names())
        for name in sorted(base_names - names):
            raise DppaError(f"{reader.folder}: delta has no tensor {name!r} of the base; was it extracted from this base?")
        for name in sorted(names - base_names):
            raise DppaError(f"{reader.folder}: tensor {name!r} is not in the base ({base.folder}); was it extracted from this base?")
        for name in names:
            if reader.shape(name) != base.shape(name):
                raise DppaError(f"{reader.info(name).file}: tensor {name!r} has shape {list(reader.shape(name))} "
                                f"but the base has {list(base.shape(name))}")
        readers.append(reader)
    return readers


def merge_deltas(base: str | os.PathLike, deltas: list, out: str | os.PathLike, *, method: str = "ties",
                 weights: list[float] | None = None, scale: float = 1.0, density: float | None = None,
                 device: str = "cpu", overwrite: bool = False, progress: bool = True, allow_pickle: bool = False,
                 max_shard_size: str = "5GB", chunk_elems: int = PARALLEL_CHUNK_ELEMS, kind: str = "model") -> Path:
    """Merge delta folders into `base` and write a model folder at `out`; returns `out`."""
    if method not in METHODS:
        raise DppaError(f"--method {method}: unknown merge method; use one of {', '.join(METHODS)}")
    if not deltas:
        raise DppaError("give at least one delta folder to merge")
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    if len(weights) != len(deltas):
        raise DppaError(f"--weights: {len(weights)} weights for {len(deltas)} deltas; give one weight per delta")
    if density is not None:
        check_density(density)
        if method != "ties":
            raise DppaError("--density is TIES's trim; for task arithmetic prune the deltas first (dppa prune)")
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
    with atomic_dir(out, overwrite) as tmp, Progress(f"merge {method}", total_bytes, len(names), progress) as bar, \
            chunk_workers() as (pool, workers):
        writer = ShardedWriter(tmp, plan, parse_size(max_shard_size))
        for name in names:
            pending = [pool.submit(trim_threshold, r, name, density, THRESHOLD_CHUNK_ELEMS) if t else None
                       for r, t in zip(readers, trim)]
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
                merged = merge_chunk(raw_base.to(dev, torch.float32, copy=True), deltas, weights, method, scale)
                return raw_base, merged.to(base_r.dtype(name)).cpu()

            for raw_base, merged in ordered_map(pool, workers, merged_chunk, chunk_ranges(base_r.numel(name), chunk_elems)):
                base_hash.update(tensor_bytes(raw_base))
                writer.write(name, merged)
                bar.advance(raw_base.numel() * (raw_base.element_size() + sum(r.dtype(name).itemsize for r in readers)))
            bar.tensor_done()
        content_hash = writer.close()
        copy_model_files(base_r.folder, tmp)
        write_manifest(tmp, {
            "kind": kind, "content_hash": content_hash, "method": method, "weights": weights, "scale": scale,
            "density": density, "trimmed": trim,
            "base": source_record(base_r.folder, base_hash.hexdigest()),
            "deltas": [source_record(r.folder, read_manifest(r.folder).get("content_hash", "")) for r in readers],
        })
    return out


def apply_delta(base: str | os.PathLike, delta: str | os.PathLike, out: str | os.PathLike, *, scale: float = 1.0,
                **kwargs) -> Path:
    """base + scale * delta, written as a model folder."""
    return merge_deltas(base, [delta], out, method="task_arithmetic", scale=scale, **kwargs)
