"""The content hash every manifest records: sha256 over each tensor's name, dtype, shape and bytes, combined in name
order, so that the same weights hash the same however they are sharded, streamed or stored (dense or sparse)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch


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
        self._name, self._current = name, tensor_digest(name, dtype, shape)

    def record(self, name: str, hexdigest: str) -> None:
        """Tensor `name`'s digest, taken elsewhere with `tensor_digest` (by a chunk worker that read it anyway)."""
        self._finish()
        self._digests[name] = hexdigest

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


def tensor_digest(name: str, dtype: torch.dtype, shape: tuple[int, ...]):
    """The sha256 of one tensor, before its bytes are added: what `ContentHasher` combines for each name."""
    return hashlib.sha256(f"{name}|{dtype}|{tuple(shape)}".encode())


def tensor_bytes(tensor) -> memoryview:
    """Zero-copy view of a CPU tensor's bytes (any dtype, bfloat16 included), or of a numpy array's (the bits of
    a bf16 chunk the merge reads in place, dppa/merging/merge.py)."""
    if isinstance(tensor, np.ndarray):
        return memoryview(np.ascontiguousarray(tensor)).cast("B")
    flat = tensor.detach().reshape(-1).contiguous()
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")
