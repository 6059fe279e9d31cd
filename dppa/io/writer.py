"""Write sharded safetensors folders as a stream: tensors (or chunks of them) arrive in a planned order.

The plan (names, dtypes, shapes) is known before the first byte, as every output of this project has the shapes of
its input, so each shard's header is written first and data follows without buffering a whole shard.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from dppa.io import sparse
from dppa.io.atomic import link_or_copy
from dppa.io.content_hash import ContentHasher, tensor_bytes
from dppa.io.safetensors_format import HEADER_ALIGN, build_header, itemsize

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3


def parse_size(text: str | int) -> int:
    """'500MB', '5GB', '2GiB' or a number of bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read size {text!r}; use e.g. 500MB or 5GB")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base**power)


@dataclass
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    shard: int
    shared: bool = False  # in a shared shard (dppa/io/sparse.py): dense, zeros as +0.0, header without artifact data
    zero: bool = False  # exactly zero: listed in its shard's header, no bytes (dppa/io/sparse.py, "Zero tensors")

    @property
    def nbytes(self) -> int:
        """The dense tensor's size."""
        return math.prod(self.shape) * itemsize(self.dtype)

    @property
    def file_bytes(self) -> int:
        """What it takes in its file when stored dense (nothing when zero)."""
        return 0 if self.zero else self.nbytes


def plan_shards(
    plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
    max_shard_bytes: int,
    shared: int = 0,
    zero: frozenset[str] | set[str] = frozenset(),
) -> list[_Entry]:
    """Shards in plan order, each at most `max_shard_bytes` (a larger tensor alone); the first `shared` tensors fill
    shards of their own; the tensors named in `zero` are exactly zero and take no bytes."""
    entries: list[_Entry] = []
    shard, used = 0, 0
    for i, (name, dtype, shape) in enumerate(plan):
        entry = _Entry(name, dtype, tuple(shape), shard, shared=i < shared, zero=name in zero)
        if (used and used + entry.file_bytes > max_shard_bytes) or (0 < i == shared):
            shard, used = shard + 1, 0
            entry.shard = shard
        used += entry.file_bytes
        entries.append(entry)
    return entries


def shard_count(entries: list[_Entry]) -> int:
    """How many files `plan_shards`' entries fill (one, empty, when there are none)."""
    return entries[-1].shard + 1 if entries else 1


def shard_file_name(shard: int, num_shards: int) -> str:
    return "model.safetensors" if num_shards == 1 else f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"


def shard_header(entries: list[_Entry], shard: int, metadata: dict | None = None) -> bytes:
    """The header of a shard holding its planned tensors dense (zero ones listed, not stored); a shared shard's
    carries SHARED_METADATA and that list only."""
    members = [e for e in entries if e.shard == shard]
    if members and members[0].shared:
        metadata = sparse.SHARED_METADATA
    zeros = sparse.zero_metadata([(e.name, e.dtype, e.shape) for e in members if e.zero])
    stored = [(e.name, e.dtype, e.shape) for e in members if not e.zero]
    return build_header(stored, {**(metadata or {}), **zeros} if zeros else metadata)


def planned_next(entries: list[_Entry], pos: int, name: str) -> _Entry:
    """The plan's entry at `pos`, which must be tensor `name`: writers take tensors in the planned order only."""
    if pos >= len(entries):
        raise RuntimeError(f"tensor {name!r} is not in the output plan (all tensors already written)")
    if name != entries[pos].name:
        raise RuntimeError(f"expected tensor {entries[pos].name!r} next, got {name!r}")
    return entries[pos]


class ShardedWriter:
    """Streams tensors into `folder` as safetensors shards with an index, hashing content as it goes."""

    def __init__(
        self,
        folder: Path,
        plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        *,
        shared: int = 0,
        zero: frozenset[str] | set[str] = frozenset(),
    ):
        """shared: the first `shared` tensors of the plan go to shared shards (dppa/io/sparse.py), zeros as +0.0.
        zero: tensors known to be exactly zero, stored as nothing; write() still takes (and checks) their data."""
        self.folder = Path(folder)
        self.entries = plan_shards(plan, max_shard_bytes, shared, zero)
        self.num_shards = shard_count(self.entries)
        self._pos = 0  # index of the tensor being written
        self._written = 0  # bytes of it written so far
        self._file = None
        self._open_shard = -1
        self.hasher = ContentHasher()
        self.bytes_written = 0

    def shard_name(self, shard: int) -> str:
        return shard_file_name(shard, self.num_shards)

    @property
    def expected(self) -> _Entry:
        return self.entries[self._pos]

    def write(self, name: str, data: torch.Tensor) -> None:
        """Append `data` (a whole tensor or the next chunk of it, any shape) to tensor `name`."""
        entry = planned_next(self.entries, self._pos, name)
        if data.dtype != entry.dtype:
            data = data.to(entry.dtype)
        if entry.shared:
            data = sparse.positive_zeros(data)
        if self._written == 0:
            self._start_tensor(entry)
        raw = tensor_bytes(data.cpu())
        if self._written + len(raw) > entry.nbytes:
            raise RuntimeError(f"tensor {name!r}: more data than its shape {entry.shape} holds")
        if entry.zero:
            if not sparse.is_zero(data):
                raise RuntimeError(f"tensor {name!r} was planned as zero but is not")
        else:
            self._file.write(raw)
            self.bytes_written += len(raw)
        self.hasher.update(raw)
        self._written += len(raw)
        if self._written == entry.nbytes:
            self._pos += 1
            self._written = 0

    def _start_tensor(self, entry: _Entry) -> None:
        self.hasher.start(entry.name, entry.dtype, entry.shape)
        if entry.shard != self._open_shard:
            if self._file:
                self._file.close()
            self._file = open(self.folder / self.shard_name(entry.shard), "wb")
            self._file.write(shard_header(self.entries, entry.shard))
            self._open_shard = entry.shard

    def close(self) -> str:
        """Finish the files; returns the content hash. Raises if any planned tensor was not fully written."""
        # Zero-size tensors never receive a write call; account for them here.
        while self._pos < len(self.entries) and self.entries[self._pos].nbytes == 0:
            self._start_tensor(self.entries[self._pos])
            self._pos += 1
        if self._pos != len(self.entries):
            raise RuntimeError(f"tensor {self.entries[self._pos].name!r} was not (fully) written")
        if self._file:
            self._file.close()
            self._file = None
        if self.num_shards > 1:
            index = {
                "metadata": {"total_size": sum(e.file_bytes for e in self.entries)},
                "weight_map": {e.name: self.shard_name(e.shard) for e in self.entries},
            }
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return self.hasher.hexdigest()


class DeltaWriter:
    """Writes a delta folder tensor by tensor (whole tensors), each tensor in the sparse layout of dppa/io/sparse.py
    where that is smaller (with `sparse=True`), else dense.

    The first `shared` tensors of the plan are those outside the pruning scope, multiplied by `scale` (1 when
    pruning). With `sparse=True` they go unscaled into shared shards (dppa/io/sparse.py), with `scale` in the index
    for the reader to apply; link_shared() takes such a shard from the input delta by a hard link when that holds it
    byte for byte. With `sparse=False` every tensor is plain safetensors, the shared ones written scaled.

    Other shards are planned from the dense sizes, so none exceeds the limit. How many values a tensor keeps is known
    only when it arrives, so such a shard's header is written last, into room reserved at the start of the file for
    the largest header its tensors could need (the unused room is JSON whitespace, which safetensors readers skip).
    The content hash is that of the dense tensors a reader returns (ContentHasher), so a sparse and a dense file of
    one delta hash the same. Zeros are written as +0.0.
    """

    def __init__(
        self,
        folder: Path,
        plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int,
        *,
        sparse: bool = True,
        shared: int = 0,
        scale: float = 1.0,
        zero: frozenset[str] | set[str] = frozenset(),
    ):
        self.folder = Path(folder)
        self.sparse = sparse
        self.outside, self.scale = shared, float(scale)
        # zero: tensors known to be exactly zero (the input's), planned as nothing (with sparse=True only: dense
        # storage is plain safetensors for any reader)
        self.entries = plan_shards(plan, max_shard_bytes, shared if sparse else 0, zero if sparse else frozenset())
        self.num_shards = shard_count(self.entries)
        self.shared_shards = sorted({e.shard for e in self.entries if e.shared})
        self.linked: list[int] = []
        self._pos = 0
        self._file = None
        self._open_shard = -1
        self._stored: list[tuple[str, torch.dtype, tuple[int, ...]]] = []  # the open shard's stored tensors
        self._sparse_shapes: dict[str, tuple[int, ...]] = {}
        self._zeros: list[tuple[str, torch.dtype, tuple[int, ...]]] = []  # the open shard's zero tensors
        self._reserved = 0
        self.weight_map: dict[str, str] = {}
        self.hasher = ContentHasher()
        self.stored_bytes = 0
        self.sparse_tensors = 0
        self.zero_tensors = 0

    def shard_name(self, shard: int) -> str:
        return shard_file_name(shard, self.num_shards)

    def link_shared(self, reader) -> int:
        """Hard-link (or, across filesystems, copy) each shared shard that the delta at `reader` (a CheckpointReader)
        holds as one file with the same header and size, read unscaled; returns how many. Call before write()."""
        if self._pos:
            raise RuntimeError("link_shared() comes before the first write()")
        for shard in self.shared_shards:
            members = [e for e in self.entries if e.shard == shard]
            if not all(e.name in reader for e in members):
                continue
            infos = [reader.info(e.name) for e in members]
            source = infos[0].file
            if any(i.file != source or i.sparse is not None or i.scale != 1.0 for i in infos):
                continue
            header = shard_header(self.entries, shard)
            if source.stat().st_size != len(header) + sum(e.file_bytes for e in members):
                continue
            with open(source, "rb") as fh:
                if fh.read(len(header)) != header:
                    continue
            target = self.folder / self.shard_name(shard)
            link_or_copy(source, target)
            self.linked.append(shard)
        return len(self.linked)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the whole tensor `name` (the next one in the plan), converted to its planned dtype."""
        entry = planned_next(self.entries, self._pos, name)
        tensor = tensor.detach().to("cpu", entry.dtype).reshape(-1)
        # Pruning multiplies by a 0/1 mask, which leaves -0.0 where a negative entry was dropped; every zero is
        # stored as +0.0 (either storage), so a dropped entry needs no bit in the sparse layout. No sum or
        # product of the merges tells -0.0 from +0.0 unless a base weight is itself -0.0.
        tensor = sparse.positive_zeros(tensor).contiguous()
        if tensor.numel() != math.prod(entry.shape):
            raise RuntimeError(f"tensor {name!r}: {tensor.numel()} elements, its shape {entry.shape} needs more")
        value = tensor  # what a reader returns
        if self._pos < self.outside and self.scale != 1.0:
            value = sparse.scaled(tensor, self.scale)
            if not entry.shared:
                tensor = value
        self._pos += 1
        self.hasher.start(name, entry.dtype, entry.shape)
        self.hasher.update(tensor_bytes(value))
        if entry.zero and not sparse.is_zero(value):
            raise RuntimeError(f"tensor {name!r} was planned as zero but is not")
        if entry.shard in self.linked:
            self.weight_map[name] = self.shard_name(entry.shard)
            self.stored_bytes += entry.file_bytes
            self.zero_tensors += entry.zero
            return
        if entry.shard != self._open_shard:
            self._open(entry.shard)
        parts = sparse.encode(tensor) if self.sparse and not entry.shared and not entry.zero else None
        if entry.zero or (parts is not None and parts["values"].numel() == 0):
            # nothing stored: a shared shard's header lists it already, another shard's lists it when written
            self.weight_map[name] = self.shard_name(entry.shard)
            self.zero_tensors += 1
            if not entry.shared:
                self._zeros.append((name, entry.dtype, entry.shape))
            return
        if parts is None:
            self._put(name, tensor.view(entry.shape))
        else:
            self._sparse_shapes[name] = entry.shape
            self.sparse_tensors += 1
            for part in sparse.PARTS:
                self._put(sparse.part_name(name, part), parts[part])

    def _put(self, stored_name: str, data: torch.Tensor) -> None:
        raw = tensor_bytes(data)
        self._file.write(raw)
        self.stored_bytes += len(raw)
        self._stored.append((stored_name, data.dtype, tuple(data.shape)))
        self.weight_map[stored_name] = self.shard_name(self._open_shard)

    def _open(self, shard: int) -> None:
        self._finish_shard()
        self._file = open(self.folder / self.shard_name(shard), "wb")
        self._open_shard = shard
        if shard in self.shared_shards:  # all dense: the header is known now
            self._reserved = 0
            self._file.write(shard_header(self.entries, shard))
            return
        members = [e for e in self.entries if e.shard == shard]
        # The largest header: every tensor sparse, every number as wide as any file could need.
        wide = (10**15,)
        worst = [(sparse.part_name(e.name, p), torch.float64, wide) for e in members for p in sparse.PARTS]
        worst_meta = sparse.header_metadata({e.name: wide * max(1, len(e.shape)) for e in members})
        self._reserved = len(build_header(worst, worst_meta)) + 16 * len(worst)
        self._reserved += -self._reserved % HEADER_ALIGN
        self._file.write(b"\0" * self._reserved)

    def _finish_shard(self) -> None:
        if self._file is None:
            return
        if self._reserved:
            metadata = sparse.header_metadata(self._sparse_shapes) if self.sparse else {}
            header = build_header(self._stored, {**metadata, **sparse.zero_metadata(self._zeros)} or None)
            body = header[8:] + b" " * (self._reserved - len(header))
            self._file.seek(0)
            self._file.write(len(body).to_bytes(8, "little") + body)
        self._file.close()
        self._file, self._stored, self._sparse_shapes, self._zeros = None, [], {}, []

    def close(self) -> str:
        """Finish the files; returns the content hash. Raises if any planned tensor was not written."""
        while self._pos < len(self.entries) and self.entries[self._pos].nbytes == 0:
            entry = self.entries[self._pos]
            self.write(entry.name, torch.empty(0, dtype=entry.dtype))
        if self._pos != len(self.entries):
            raise RuntimeError(f"tensor {self.entries[self._pos].name!r} was not written")
        self._finish_shard()
        scales = {self.shard_name(s): self.scale for s in self.shared_shards} if self.scale != 1.0 else {}
        if self.num_shards > 1 or scales:
            metadata = {"total_size": self.stored_bytes, **({sparse.SCALE_KEY: scales} if scales else {})}
            index = {"metadata": metadata, "weight_map": self.weight_map}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return self.hasher.hexdigest()

    def storage_record(self) -> dict:
        """The manifest's description of the files' layout."""
        if not self.sparse:
            return {"format": "dense"}
        return {
            "format": sparse.FORMAT,
            "version": sparse.VERSION,
            "sparse_tensors": self.sparse_tensors,
            "zero_tensors": self.zero_tensors,
            "dense_tensors": len(self.entries) - self.sparse_tensors - self.zero_tensors,
            "stored_bytes": self.stored_bytes,
            "dense_bytes": sum(e.nbytes for e in self.entries),
            "shared_shards": len(self.shared_shards),
            "linked_shards": len(self.linked),
            "shared_scale": self.scale,
        }
