"""Rewrite a delta folder tensor by tensor: pruning and amplification, on the streaming driver (dppa/io/stream.py)."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from pathlib import Path

import torch

from dppa.errors import DppaError
from dppa.io.manifest import read_manifest, source_record, write_manifest
from dppa.io.model_files import copy_model_files
from dppa.io.reader import CheckpointReader
from dppa.io.space import same_disk
from dppa.io.stream import Stream
from dppa.io.writer import DeltaWriter, parse_size
from dppa.sparsify.scope import layer_of

# fn(name, delta in its stored dtype on the compute device, layer index) -> new delta, for in-scope tensors (any float
# dtype; it is written in the stored dtype)
TensorFn = Callable[[str, torch.Tensor, int], torch.Tensor]


def check_density(density: float, flag: str = "--density") -> float:
    if not (0.0 < density <= 1.0):
        raise DppaError(f"{flag} {density}: must be in (0, 1] (the share of delta entries kept)")
    return density


STORAGE = ("sparse", "dense")


def check_storage(storage: str) -> str:
    if storage not in STORAGE:
        raise DppaError(f"--storage {storage}: use one of {', '.join(STORAGE)}")
    return storage


def transform_delta(
    reader: CheckpointReader,
    out: Path,
    fn: TensorFn,
    *,
    scope: re.Pattern,
    device: torch.device,
    manifest: dict,
    desc: str,
    overwrite: bool,
    progress: bool,
    max_shard_size: str = "5GB",
    storage: str = "sparse",
    outside_scale: float = 1.0,
    density: float = 1.0,
) -> Path:
    """Apply `fn` to every in-scope tensor of the delta at `reader` and write the result, same names, shapes and
    dtypes; out-of-scope tensors are multiplied by `outside_scale` (dppa.io.sparse.scaled).

    storage: `sparse` writes each in-scope tensor in the sparse layout (dppa/io/sparse.py) where that is smaller and
    the out-of-scope ones in shared shards, hard-linked from the input where it holds them (DeltaWriter); `dense`
    writes plain safetensors. `density`: the largest share of in-scope entries `fn` keeps, for the disk-space
    check.
    """
    check_storage(storage)
    upstream = read_manifest(reader.folder)
    inside = [n for n in reader.names() if layer_of(scope, n) is not None]
    outside = [n for n in reader.names() if layer_of(scope, n) is None]
    names = outside + inside
    plan = [(n, reader.dtype(n), reader.shape(n)) for n in names]

    def transform(name: str) -> torch.Tensor:
        return fn(name, reader.get(name).to(device), layer_of(scope, name)).cpu()

    with Stream(
        out,
        desc=desc,
        total_bytes=reader.total_bytes(),
        tensors=len(names),
        overwrite=overwrite,
        needed_bytes=_output_bytes(reader, out, inside, outside, storage, density),
        progress=progress,
    ) as stream:
        writer = stream.writer = DeltaWriter(
            stream.tmp,
            plan,
            parse_size(max_shard_size),
            sparse=storage == "sparse",
            shared=len(outside),
            scale=outside_scale,
            zero={n for n in names if reader.info(n).zero},  # zero in, zero out: pruning and scaling keep zeros
        )
        writer.link_shared(reader)
        # an out-of-scope tensor in a linked shard is only hashed by the writer
        unchanged = ((n, reader.get(n)) for n in outside)
        computed = stream.map_tensors(transform, inside)
        stream.tensors(itertools.chain(unchanged, computed), lambda n: reader.info(n).nbytes)
        content_hash = writer.close()
        copy_model_files(reader.folder, stream.tmp)
        record = {key: upstream[key] for key in ("base", "finetuned", "vocab_growth") if key in upstream}
        write_manifest(
            stream.tmp,
            {
                **manifest,
                "content_hash": content_hash,
                "storage": writer.storage_record(),
                "source_delta": source_record(reader.folder, upstream.get("content_hash", "")),
                **record,
            },
        )
    return out


def _output_bytes(reader, out: Path, inside: list[str], outside: list[str], storage: str, density: float) -> int:
    """An upper bound on the output's size: in-scope tensors at `density` in the sparse layout (bit mask plus kept
    values) or dense; out-of-scope ones dense unless they can be hard-linked from the input (same disk)."""
    dense = {n: reader.numel(n) * reader.dtype(n).itemsize for n in inside + outside}
    if storage == "sparse":
        kept = sum(
            min(dense[n], int(reader.numel(n) * (density * reader.dtype(n).itemsize + 0.125)) + 4096) for n in inside
        )
    else:
        kept = sum(dense[n] for n in inside)
    linked = storage == "sparse" and same_disk(reader.folder, out.parent)
    return kept + (0 if linked else sum(dense[n] for n in outside))
