"""Write sharded safetensors folders as a stream: tensors (or chunks of them) arrive in a planned order.

The plan (names, dtypes, shapes) is known before the first byte, as every output of this project has the shapes of
its input, so each shard's header is written first and data follows without buffering a whole shard.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from dppa.io import sparse
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

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


class ContentHasher:
    """sha256 over (name, dtype, shape, bytes) of every tensor, combined in name order.

    Independent of sharding and of the order tensors are streamed in, so the same weights always hash the same.
    """

    def __init__(self):
        self._digests: dict[str, str] = {}
        self._name: str | None = None
        self._current = None

    def start(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self._finish()
        self._name, self._current = name, hashlib.sha256(f"{name}|{dtype}|{tuple(shape)}".encode())

    def update(self, raw) -> None:
        self._current.update(raw)

    def _finish(self) -> None:
        if self._name is not None:
            self._digests[self._name] = self._current.hexdigest()
            self._name = None

    def hexdigest(self) -> str:
        self._finish()
        total = hashlib.sha256()
        for name in sorted(self._digests):
            total.update(f"{name}={self._digests[name]};".encode())
        return total.hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Zero-copy view of a CPU tensor's bytes (any dtype, bfloat16 included)."""
    flat = tensor.detach().reshape(-1).contiguous()
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


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
    ):
        self.folder = Path(folder)
        self.entries: list[_Entry] = []
        shard, used = 0, 0
        for name, dtype, shape in plan:
            entry = _Entry(name, dtype, tuple(shape), shard)
            if used and used + entry.nbytes > max_shard_bytes:
                shard, used = shard + 1, 0
                entry.shard = shard
            used += entry.nbytes
            self.entries.append(entry)
        self.num_shards = shard + 1
        self._pos = 0  # index of the tensor being written
        self._written = 0  # bytes of it written so far
        self._file = None
        self._open_shard = -1
        self.hasher = ContentHasher()
        self.bytes_written = 0

    def shard_name(self, shard: int) -> str:
        if self.num_shards == 1:
            return "model.safetensors"
        return f"model-{shard + 1:05d}-of-{self.num_shards:05d}.safetensors"

    @property
    def expected(self) -> _Entry:
        return self.entries[self._pos]

    def write(self, name: str, data: torch.Tensor) -> None:
        """Append `data` (a whole tensor or the next chunk of it, any shape) to tensor `name`."""
        entry = planned_next(self.entries, self._pos, name)
        if data.dtype != entry.dtype:
            data = data.to(entry.dtype)
        if self._written == 0:
            self._start_tensor(entry)
        raw = tensor_bytes(data.cpu())
        if self._written + len(raw) > entry.nbytes:
            raise RuntimeError(f"tensor {name!r}: more data than its shape {entry.shape} holds")
        self._file.write(raw)
        self.hasher.update(raw)
        self._written += len(raw)
        self.bytes_written += len(raw)
        if self._written == entry.nbytes:
            self._pos += 1
            self._written = 0

    def _start_tensor(self, entry: _Entry) -> None:
        self.hasher.start(entry.name, entry.dtype, entry.shape)
        if entry.shard != self._open_shard:
            if self._file:
                self._file.close()
            members = [(e.name, e.dtype, e.shape) for e in self.entries if e.shard == entry.shard]
            self._file = open(self.folder / self.shard_name(entry.shard), "wb")
            self._file.write(build_header(members))
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
                "metadata": {"total_size": sum(e.nbytes for e in self.entries)},
                "weight_map": {e.name: self.shard_name(e.shard) for e in self.entries},
            }
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return self.hasher.hexdigest()


class DeltaWriter:
    """Writes a delta folder tensor by tensor (whole tensors), each tensor in the sparse layout of dppa/io/sparse.py
    where that is smaller (with `sparse=True`), else dense.

    Shards are planned from the dense sizes, so none exceeds the limit. How many values a tensor keeps is known only
    when it arrives, so each shard's header is written last, into room reserved at the start of the file for the
    largest header its tensors could need (the unused room is JSON whitespace, which safetensors readers skip).
    The content hash is the dense tensors' (ContentHasher), so a sparse and a dense file of one delta hash the same.
    Zeros are written as +0.0.
    """

    def __init__(
        self,
        folder: Path,
        plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int,
        *,
        sparse: bool = True,
    ):
        self.folder = Path(folder)
        self.sparse = sparse
        layout = ShardedWriter(folder, plan, max_shard_bytes)  # its shard plan only
        self.entries = layout.entries
        self.num_shards = layout.num_shards
        self.shard_name = layout.shard_name
        self._pos = 0
        self._file = None
        self._open_shard = -1
        self._stored: list[tuple[str, torch.dtype, tuple[int, ...]]] = []  # the open shard's stored tensors
        self._sparse_shapes: dict[str, tuple[int, ...]] = {}
        self._reserved = 0
        self.weight_map: dict[str, str] = {}
        self.hasher = ContentHasher()
        self.bytes_written = 0
        self.sparse_tensors = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the whole tensor `name` (the next one in the plan), converted to its planned dtype."""
        entry = planned_next(self.entries, self._pos, name)
        tensor = tensor.detach().to("cpu", entry.dtype).reshape(-1)
        # Pruning multiplies by a 0/1 mask, which leaves -0.0 where a negative entry was dropped; every zero is
        # stored as +0.0 (either storage), so a dropped entry needs no bit in the sparse layout. No sum or
        # product of the merges tells -0.0 from +0.0 unless a base weight is itself -0.0.
        tensor = torch.where(tensor == 0, torch.zeros((), dtype=tensor.dtype), tensor).contiguous()
        if tensor.numel() != math.prod(entry.shape):
            raise RuntimeError(f"tensor {name!r}: {tensor.numel()} elements, its shape {entry.shape} needs more")
        if entry.shard != self._open_shard:
            self._open(entry.shard)
        self.hasher.start(name, entry.dtype, entry.shape)
        self.hasher.update(tensor_bytes(tensor))
        parts = sparse.encode(tensor) if self.sparse else None
        if parts is None:
            self._put(name, tensor.view(entry.shape))
        else:
            self._sparse_shapes[name] = entry.shape
            self.sparse_tensors += 1
            for part in sparse.PARTS:
                self._put(sparse.part_name(name, part), parts[part])
        self._pos += 1

    def _put(self, stored_name: str, data: torch.Tensor) -> None:
        raw = tensor_bytes(data)
        self._file.write(raw)
        self.bytes_written += len(raw)
        self._stored.append((stored_name, data.dtype, tuple(data.shape)))
        self.weight_map[stored_name] = self.shard_name(self._open_shard)

    def _open(self, shard: int) -> None:
        self._finish_shard()
        members = [e for e in self.entries if e.shard == shard]
        # The largest header: every tensor sparse, every number as wide as any file could need.
        wide = (10**15,)
        worst = [(sparse.part_name(e.name, p), torch.float64, wide) for e in members for p in sparse.PARTS]
        worst_meta = sparse.header_metadata({e.name: wide * max(1, len(e.shape)) for e in members})
        self._reserved = len(build_header(worst, worst_meta)) + 16 * len(worst)
        self._reserved += -self._reserved % HEADER_ALIGN
        self._file = open(self.folder / self.shard_name(shard), "wb")
        self._file.write(b"\0" * self._reserved)
        self._open_shard = shard

    def _finish_shard(self) -> None:
        if self._file is None:
            return
        metadata = sparse.header_metadata(self._sparse_shapes) if self.sparse else None
        header = build_header(self._stored, metadata)
        body = header[8:] + b" " * (self._reserved - len(header))
        self._file.seek(0)
        self._file.write(len(body).to_bytes(8, "little") + body)
        self._file.close()
        self._file, self._stored, self._sparse_shapes = None, [], {}

    def close(self) -> str:
        """Finish the files; returns the content hash. Raises if any planned tensor was not written."""
        while self._pos < len(self.entries) and self.entries[self._pos].nbytes == 0:
            entry = self.entries[self._pos]
            self.write(entry.name, torch.empty(0, dtype=entry.dtype))
        if self._pos != len(self.entries):
            raise RuntimeError(f"tensor {self.entries[self._pos].name!r} was not written")
        self._finish_shard()
        if self.num_shards > 1:
            index = {"metadata": {"total_size": self.bytes_written}, "weight_map": self.weight_map}
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
            "dense_tensors": len(self.entries) - self.sparse_tensors,
            "stored_bytes": self.bytes_written,
            "dense_bytes": sum(e.nbytes for e in self.entries),
        }
