"""The one streaming driver: a pass from checkpoints to a new folder, tensor by tensor, shared by extract, prune /
amplify and merge.

It owns what the three have in common: the output folder (written in a temporary folder, renamed into place when
complete, never over a user's folder unless asked), the progress bar, the worker pool, the writer, and the content
hashes of the inputs read on the way (a manifest records the hash of every model an output was computed from).
What differs, the per-tensor or per-chunk computation and the manifest, is the caller's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from dppa.compute import Progress, chunk_workers, ordered_map
from dppa.io.atomic import atomic_dir
from dppa.io.content_hash import ContentHasher, tensor_bytes
from dppa.io.reader import CheckpointReader


class StreamInput:
    """A checkpoint read alongside the output: its bytes count in the progress, and, when `hashed`, its content hash
    is taken as it is read, so the manifest can name exactly what the output came from without a second read."""

    def __init__(self, reader: CheckpointReader, hashed: bool = True):
        self.reader = reader
        self.hasher = ContentHasher() if hashed else None
        self._recorded: set[str] = set()  # tensors whose digest a worker took (`record`)
        self._hashing = False  # whether the tensor being streamed is hashed here

    def record(self, name: str, hexdigest: str) -> None:
        """Take tensor `name`'s digest as given (computed by a worker as it read the tensor, see `finish`), and
        skip that tensor when it is streamed."""
        self.hasher.record(name, hexdigest)
        self._recorded.add(name)

    def start(self, name: str) -> None:
        self._hashing = self.hasher is not None and name not in self._recorded
        if self._hashing:
            self.hasher.start(name, self.reader.dtype(name), self.reader.shape(name))

    def update(self, raw: torch.Tensor) -> None:
        if self._hashing:
            self.hasher.update(tensor_bytes(raw))

    def finish(self, name: str, covered: int, chunk_elems: int, digest=None) -> None:
        """Hash the entries of `name` beyond the first `covered` ones, which the output does not use: the rows a
        fine-tune added to its vocabulary belong to its content hash, not to its delta (dppa/extract.py). Into
        `digest` (a `tensor_digest`) when given, else into this input's hash of the tensor being streamed."""
        if (digest is not None or self._hashing) and self.reader.numel(name) > covered:
            target = self.hasher if digest is None else digest
            for _, rest in self.reader.iter_chunks(name, chunk_elems, start=covered):
                target.update(tensor_bytes(rest))

    def hexdigest(self) -> str:
        return self.hasher.hexdigest()


# fn(span) -> (the raw chunks read, one per input in order, the output chunk, anything the caller collects)
ChunkFn = Callable[[tuple[int, int]], tuple[list[torch.Tensor], torch.Tensor, Any]]


class Stream:
    """`with Stream(out, ...) as stream:` gives `stream.tmp` (the folder being written), `stream.pool` and
    `stream.workers`; `stream.writer` is set by the caller (a ShardedWriter or a DeltaWriter over `stream.tmp`).
    Leaving the block renames `tmp` to `out`; an error leaves nothing at `out`."""

    def __init__(
        self,
        out: Path,
        *,
        desc: str,
        total_bytes: int,
        tensors: int,
        overwrite: bool,
        needed_bytes: int,
        progress: bool,
    ):
        self._out, self._overwrite, self._needed = out, overwrite, needed_bytes
        self._desc, self._total, self._tensors, self._progress = desc, total_bytes, tensors, progress
        self.writer = None

    def __enter__(self) -> Stream:
        self._stack = contextlib.ExitStack()
        with self._stack as stack:
            self.tmp = stack.enter_context(atomic_dir(self._out, self._overwrite, needed_bytes=self._needed))
            self.bar = stack.enter_context(Progress(self._desc, self._total, self._tensors, self._progress))
            self.pool, self.workers = stack.enter_context(chunk_workers())
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> bool | None:
        return self._stack.__exit__(*exc)

    def chunks(
        self,
        name: str,
        spans: list[tuple[int, int]],
        fn: ChunkFn,
        inputs: list[StreamInput],
        chunk_elems: int,
        on_first: Callable[[], None] | None = None,
    ) -> list:
        """Compute tensor `name` chunk by chunk in the pool (in order, a few chunks in flight), hash each input's raw
        chunk, write the output chunks; returns what `fn` returned third for each chunk. `chunk_elems` is the chunk
        size used to hash an input's entries beyond the output's (a grown vocabulary). `on_first()` is called once
        the first chunk is in: work the caller submits then is queued behind this tensor's first chunks, not
        before them."""
        for source in inputs:
            source.start(name)
        collected = []
        for raws, result, extra in ordered_map(self.pool, self.workers, fn, spans):
            for source, raw in zip(inputs, raws):
                source.update(raw)
            self.writer.write(name, result)
            self.bar.advance(sum(raw.nbytes for raw in raws))
            collected.append(extra)
            if on_first is not None:
                on_first()
                on_first = None
        covered = sum(count for _, count in spans)
        for source in inputs:
            source.finish(name, covered, chunk_elems)
        self.bar.tensor_done()
        return collected

    def tensors(self, items: Iterable[tuple[str, torch.Tensor]], nbytes: Callable[[str], int]) -> None:
        """Write whole tensors in order (`items` may be computed in the pool, see `map_tensors`); `nbytes(name)`: the
        input bytes each one stands for in the progress."""
        for name, tensor in items:
            self.writer.write(name, tensor)
            self.bar.advance(nbytes(name))
            self.bar.tensor_done()

    def map_tensors(self, fn: Callable[[str], torch.Tensor], names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """`(name, fn(name))` in order, one tensor per worker in flight: memory stays at a few copies of the largest
        tensor."""
        return zip(names, ordered_map(self.pool, self.workers, fn, names, window=self.workers))
