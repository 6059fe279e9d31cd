"""Read a Hugging Face model folder tensor by tensor (or chunk by chunk) without loading whole files.

Supports one `model.safetensors`, shards listed in `model.safetensors.index.json`, or any set of `*.safetensors`
files. Sparse delta files (dppa/io/sparse.py) read as the dense tensors they encode, so no caller tells them apart.
Pickle checkpoints (`*.bin`, `*.pt`) are refused unless the caller opts in, since unpickling can run code.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dppa.errors import DppaError
from dppa.io import codec, sparse
from dppa.io.safetensors_format import DTYPES, FormatError, itemsize, parse_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
HEADER_PROBE_BYTES = 1 << 20
MAPPED_TENSORS = 4  # per reader, see bits_view: a merge views one tensor while its workers find the next's thresholds


@dataclass(frozen=True)
class SparseInfo:
    """Where a sparse tensor's parts lie in its file (absolute byte offsets) and how many values it keeps."""

    counts: int
    mask: int
    kept: int


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first element (of the kept values, when sparse) in `file`
    sparse: SparseInfo | None = None
    scale: float = 1.0  # a shared shard read scaled (dppa/io/sparse.py), as the folder's index says
    zero: bool = False  # exactly zero, stored as nothing (dppa/io/sparse.py, "Zero tensors")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """The dense tensor's size, whatever its layout on disk."""
        return self.numel * itemsize(self.dtype)

    @property
    def stored_bytes(self) -> int:
        if self.zero:
            return 0
        if self.sparse is None:
            return self.nbytes
        return sparse.sparse_nbytes(self.numel, self.sparse.kept, self.dtype)


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(HEADER_PROBE_BYTES)
        if len(head) >= 8:
            need = 8 + int.from_bytes(head[:8], "little")
            if len(head) < need <= size:
                head += fh.read(need - len(head))
    try:
        tensors, metadata, _ = parse_header(head, size)
    except FormatError as exc:
        raise DppaError(f"{path}: {exc}") from None
    infos = {n: TensorInfo(path, d, s, o) for n, (d, s, o) in tensors.items()}
    if "dppa_format" in metadata:
        infos = _sparse_infos(path, infos, metadata)
    if sparse.ZERO_KEY in metadata:
        infos.update(_zero_infos(path, metadata[sparse.ZERO_KEY], set(infos)))
    return infos, metadata


def _zero_infos(path: Path, listed: str, stored: set[str]) -> dict[str, TensorInfo]:
    """The zero tensors a file's header lists (dppa/io/sparse.py, "Zero tensors")."""
    try:
        zeros = {
            name: (DTYPES[dtype], tuple(int(n) for n in shape)) for name, (dtype, shape) in json.loads(listed).items()
        }
    except (ValueError, TypeError, KeyError):
        raise DppaError(
            f"{path}: its list of zero tensors ({sparse.ZERO_KEY}) is not valid; recreate the delta"
        ) from None
    if zeros.keys() & stored:
        raise DppaError(f"{path}: tensor {sorted(zeros.keys() & stored)[0]!r} is both stored and listed as zero")
    return {name: TensorInfo(path, dtype, shape, 0, zero=True) for name, (dtype, shape) in zeros.items()}


def _sparse_infos(path: Path, stored: dict[str, TensorInfo], metadata: dict) -> dict[str, TensorInfo]:
    """The dense tensors a sparse file encodes (dppa/io/sparse.py), from its stored parts."""
    fmt, version = metadata.get("dppa_format"), metadata.get("dppa_format_version")
    if fmt != sparse.FORMAT or version not in sparse.READABLE_VERSIONS:
        raise DppaError(
            f"{path}: delta format {fmt!r} version {version!r} is not one this dppa reads "
            f"({sparse.FORMAT!r} version {sparse.VERSION}); upgrade dppa or recreate the delta"
        )
    try:
        shapes = json.loads(metadata["dppa_sparse"])
        block = int(metadata["dppa_block"])
    except (KeyError, ValueError):
        raise DppaError(f"{path}: sparse delta header without a valid dppa_sparse/dppa_block; recreate it") from None
    if block != sparse.BLOCK:
        raise DppaError(f"{path}: sparse block size {block} is not {sparse.BLOCK}; recreate the delta")
    infos = dict(stored)
    for name, shape in shapes.items():
        parts = {part: infos.pop(sparse.part_name(name, part), None) for part in sparse.PARTS}
        numel = math.prod(shape)
        counts, mask, values = parts["counts"], parts["mask"], parts["values"]
        if (
            counts is None
            or mask is None
            or values is None
            or counts.shape != (sparse.block_count(numel),)
            or mask.shape != (sparse.mask_bytes(numel),)
            or len(values.shape) != 1
        ):
            raise DppaError(f"{path}: sparse tensor {name!r} has missing or malformed parts; the file is corrupt")
        infos[name] = TensorInfo(
            path, values.dtype, tuple(shape), values.offset, SparseInfo(counts.offset, mask.offset, values.shape[0])
        )
    return infos


class CheckpointReader:
    """Random access to the tensors of a checkpoint folder, one tensor or chunk at a time."""

    def __init__(self, folder: Path, infos: dict[str, TensorInfo]):
        self.folder = folder
        self._infos = infos
        self._handles: dict[tuple[Path, str], int] = {}
        self._maps: collections.OrderedDict[str, tuple[mmap.mmap, int]] = collections.OrderedDict()  # bits_view
        self._counts: dict[tuple[Path, int], list[int]] = {}  # sparse tensors' block counts, see _block_counts
        self._lock = threading.Lock()
        self.config = _read_json(folder / "config.json")

    # -- metadata ---------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names in on-disk order, so a full walk reads every file sequentially."""
        return sorted(self._infos, key=lambda n: (str(self._infos[n].file), self._infos[n].offset))

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise DppaError(f"{self.folder}: has no tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).dtype

    def numel(self, name: str) -> int:
        return self.info(name).numel

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    def stored_bytes(self) -> int:
        """Bytes of tensor data on disk (smaller than total_bytes() for sparse deltas)."""
        return sum(i.stored_bytes for i in self._infos.values())

    # -- data -------------------------------------------------------------------------------------------------
    def read_flat(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Elements [start, start+count) of the flattened tensor, in its stored dtype, in fresh CPU memory."""
        info = self.info(name)
        count = info.numel - start if count is None else count
        _check_range(info, name, start, count)
        if info.zero:
            return torch.zeros(count, dtype=info.dtype)
        if info.sparse is not None:
            return self._read_sparse(info, start, count)
        values = self._read(info.file, info.offset + start * itemsize(info.dtype), count, info.dtype)
        return values if info.scale == 1.0 else sparse.scaled(values, info.scale, inplace=True)

    def bits_view(self, name: str, start: int, count: int):
        """Elements [start, start+count) of a 16-bit tensor stored dense, as a read-only numpy int16 view of the
        file's pages (no copy: the compiled merge kernels read them in place); None for any other tensor (sparse,
        scaled, zero, another dtype, misaligned), which `read_flat` reads. The views stay valid while the reader
        exists; files are never changed in place (outputs are renamed into place), so the pages stay the same.
        Only the MAPPED_TENSORS tensors viewed last stay mapped, so the file pages a merge holds, which count in its
        resident memory, are a few tensors' (mapping whole files took a merge of SmolLM2-135M from 0.3 to 1 GB)."""
        info = self.info(name)
        stored_dense = not info.zero and info.sparse is None and info.scale == 1.0 and info.numel > 0
        if not stored_dense or itemsize(info.dtype) != 2 or info.offset % 2:
            return None
        _check_range(info, name, start, count)
        with self._lock:
            mapped = self._maps.pop(name, None) or self._map_tensor(info, name)
            self._maps[name] = mapped  # the most recent last
            while len(self._maps) > MAPPED_TENSORS:
                self._maps.popitem(last=False)  # unmapped when its last view is gone
        pages, first = mapped
        return np.frombuffer(pages, dtype=np.int16, count=count, offset=info.offset - first + start * 2)

    def _map_tensor(self, info: TensorInfo, name: str) -> tuple[mmap.mmap, int]:
        """(a read-only mapping of the pages that hold tensor `name`, the file offset where it begins)."""
        first = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
        end = info.offset + info.nbytes
        if end > info.file.stat().st_size:
            raise DppaError(f"{info.file}: ends before tensor {name!r} does; the file is truncated")
        with open(info.file, "rb") as f:
            return mmap.mmap(f.fileno(), end - first, access=mmap.ACCESS_READ, offset=first), first

    def _read(self, path: Path, offset: int, count: int, dtype: torch.dtype, stream: str = "") -> torch.Tensor:
        buf = torch.empty(count * itemsize(dtype), dtype=torch.uint8)
        self._read_into(path, offset, buf, stream)
        return buf.view(dtype)

    def _read_sparse(self, info: TensorInfo, start: int, count: int) -> torch.Tensor:
        """Decode elements [start, start+count): the mask from the start of their block, then their values."""
        out = torch.empty(count, dtype=info.dtype)
        if count == 0:
            return out
        counts = self._block_counts(info)
        block, end = start // sparse.BLOCK, start + count
        first_bit = block * sparse.BLOCK
        first_byte, end_byte = first_bit // 8, math.ceil(end / 8)
        mask_bytes = end_byte - first_byte
        mask = self._read(info.file, info.sparse.mask + first_byte, mask_bytes, torch.uint8, stream="mask").numpy()
        head = start - first_bit
        before = counts[block] + codec.count_kept(mask, 0, head)
        if end % sparse.BLOCK == 0 or end == info.numel:  # chunks end on a block: the counts know their values
            n_kept = counts[math.ceil(end / sparse.BLOCK)] - before
        else:
            n_kept = codec.count_kept(mask, head, count)
        if n_kept < 0 or before + n_kept > info.sparse.kept:
            raise DppaError(f"{info.file}: sparse tensor's mask and values disagree; the file is corrupt")
        size = itemsize(info.dtype)
        values = self._read(info.file, info.offset + before * size, n_kept, info.dtype)
        try:  # it checks that the mask keeps exactly n_kept elements of the range
            codec.expand(mask, head, values.view(torch.uint8).numpy(), out.view(torch.uint8).numpy(), size)
        except ValueError as err:
            raise DppaError(
                f"{info.file}: sparse tensor's mask and values disagree ({err}); the file is corrupt"
            ) from None
        return out

    def _block_counts(self, info: TensorInfo) -> list[int]:
        """The values kept before each block of a sparse tensor, then the total: read once per tensor."""
        key = (info.file, info.sparse.counts)
        counts = self._counts.get(key)
        if counts is None:
            stored = self._read(info.file, info.sparse.counts, sparse.block_count(info.numel), torch.int64).tolist()
            counts = [*stored, info.sparse.kept]
            steps = [b - a for a, b in zip(counts, counts[1:])]
            if counts[0] != 0 or min(steps) < 0 or max(steps) > sparse.BLOCK:
                raise DppaError(f"{info.file}: sparse tensor's block counts are not valid; the file is corrupt")
            self._counts[key] = counts  # a small list: a 7B matrix of 45M elements has 688 blocks
        return counts

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = self.read_flat(name).view(self.info(name).shape)
        return tensor if dtype is None else tensor.to(dtype)

    def iter_chunks(self, name: str, chunk_elems: int, start: int = 0):
        """Yield (start, flat chunk) over the tensor from element `start`; chunks hold at most `chunk_elems`."""
        numel = self.info(name).numel
        for at in range(start, numel, max(1, chunk_elems)):
            yield at, self.read_flat(name, at, min(chunk_elems, numel - at))

    def _read_into(self, path: Path, offset: int, buf: torch.Tensor, stream: str = "") -> None:
        # A sparse tensor is read as two sequential streams at once, its mask and its values: each has a descriptor
        # of its own, so the kernel's read-ahead (kept per open file) sees two sequential readers, not a random one.
        key = (path, stream)
        fd = self._handles.get(key)
        if fd is None:
            with self._lock:  # chunk workers read in parallel; open each file once per stream
                fd = self._handles.get(key)
                if fd is None:
                    fd = self._handles[key] = os.open(path, os.O_RDONLY)
        view = memoryview(buf.numpy()).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise DppaError(f"{path}: unexpected end of file at byte {offset + done}; the file is truncated")
            done += n

    def close(self) -> None:
        for fd in getattr(self, "_handles", {}).values():
            os.close(fd)
        self._handles.clear()
        for pages, _ in getattr(self, "_maps", {}).values():
            with contextlib.suppress(BufferError):  # a view still in use: the mapping goes with its last view
                pages.close()
        getattr(self, "_maps", {}).clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


class PickleCheckpointReader(CheckpointReader):
    """Opt-in reader for `*.bin` checkpoints: loads one shard at a time (weights_only, memory-mapped)."""

    def __init__(self, folder: Path, files: list[Path]):
        self.folder = folder
        self.config = _read_json(folder / "config.json")
        self._handles = {}
        self._shard_of: dict[str, Path] = {}
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self._loaded: tuple[Path, dict] | None = None
        for f in files:
            state = self._load(f)
            for n, t in state.items():
                self._shard_of[n] = f
                self._meta[n] = (t.dtype, tuple(t.shape))
        self._infos = {n: TensorInfo(self._shard_of[n], d, s, 0) for n, (d, s) in self._meta.items()}

    def bits_view(self, name: str, start: int, count: int):
        return None  # tensors come from torch.load, not from file offsets

    def _load(self, f: Path) -> dict:
        if self._loaded is None or self._loaded[0] != f:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises several types for corrupt archives
                raise DppaError(f"{f}: cannot load pickle checkpoint ({exc.__class__.__name__}: {exc})") from None
            self._loaded = (f, state)
        return self._loaded[1]

    def names(self) -> list[str]:
        return list(self._meta)

    def read_flat(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        info = self.info(name)
        flat = self._load(info.file)[name].reshape(-1)
        count = info.numel - start if count is None else count
        return flat[start : start + count].clone()


def _check_range(info: TensorInfo, name: str, start: int, count: int) -> None:
    if start < 0 or count < 0 or start + count > info.numel:
        raise ValueError(f"range [{start}, {start + count}) outside tensor {name!r} of {info.numel} elements")


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DppaError(f"{path}: invalid JSON ({exc}); fix or re-download it") from None


def _safetensors_files(folder: Path) -> tuple[list[Path], dict[Path, float]]:
    """The weight files, and the factor each shared shard is read scaled by (dppa/io/sparse.py)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        body = _read_json(index) or {}
        weight_map = body.get("weight_map")
        if not isinstance(weight_map, dict):
            raise DppaError(f"{index}: has no 'weight_map'; the index is corrupt")
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f for f in files if not f.exists()]
        if missing:
            raise DppaError(f"{missing[0]}: shard listed in {index.name} is missing; re-download the model")
        scales = (body.get("metadata") or {}).get(sparse.SCALE_KEY) or {}
        if not isinstance(scales, dict) or any(
            folder / f not in files or not isinstance(v, (int, float)) for f, v in scales.items()
        ):
            raise DppaError(
                f"{index}: metadata.{sparse.SCALE_KEY} names no shard of the folder or no number; recreate the delta"
            )
        return files, {folder / f: float(v) for f, v in scales.items()}
    single = folder / "model.safetensors"
    if single.exists():
        return [single], {}
    return sorted(folder.glob("*.safetensors")), {}


def open_checkpoint(folder: str | os.PathLike, allow_pickle: bool = False) -> CheckpointReader:
    """Open a model or delta folder for streaming reads."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DppaError(f"{folder}: not a folder; give the path of a model folder (config.json + *.safetensors)")
    files, scales = _safetensors_files(folder)
    if files:
        infos: dict[str, TensorInfo] = {}
        for f in files:
            file_infos, metadata = read_safetensors_header(f)
            if f in scales:
                if {k: v for k, v in metadata.items() if k != sparse.ZERO_KEY} != {
                    "format": "pt",
                    **sparse.SHARED_METADATA,
                }:
                    raise DppaError(f"{f}: the index scales it but it is no shared shard; the delta is corrupt")
                file_infos = {n: dataclasses.replace(i, scale=scales[f]) for n, i in file_infos.items()}
            for name, info in file_infos.items():
                if name in infos:
                    raise DppaError(
                        f"{f}: tensor {name!r} also appears in {infos[name].file.name}; remove the duplicate"
                    )
                infos[name] = info
        return CheckpointReader(folder, infos)
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        if not allow_pickle:
            raise DppaError(
                f"{pickles[0]}: pickle checkpoints can run code when loaded; convert the model to safetensors "
                "or pass --allow-pickle if you trust its source"
            )
        return PickleCheckpointReader(folder, pickles)
    raise DppaError(f"{folder}: no *.safetensors weights found; give a Hugging Face model folder")
