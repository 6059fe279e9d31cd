"""The sparse delta format: pruned and amplified deltas stored as a bit mask plus the kept values.

A sparse delta folder is an ordinary set of safetensors files (one per shard, with an index when sharded). A file
whose header metadata has ``dppa_format = "sparse-bitmask"`` (and ``dppa_format_version``) stores each tensor
``NAME`` of ``dppa_sparse`` (a JSON object: NAME -> its dense shape) as three stored tensors, back to back:

- ``NAME::counts`` (I64, one per block of ``dppa_block`` elements): how many values are kept before each block,
  so a reader finds the values of any range without reading the mask before it;
- ``NAME::mask`` (U8): bit ``i % 8`` of byte ``i // 8`` is set when flat element ``i`` is kept, padded with zero
  bytes to a multiple of 8;
- ``NAME::values`` (the delta's dtype): the kept elements in flat order.

An element is kept when its bits are not all zero; the writer stores every zero as +0.0 (pruning leaves -0.0 where
it drops a negative entry), so decoding gives back exactly the bytes of the dense file the same writer would write.
Tensors for which this layout is not smaller are stored as plain safetensors tensors in the same file. At density
0.2 a bf16 tensor takes 0.2 + 1/16 of its dense size.

Shared shards. The tensors outside the pruning scope (embeddings, norms, biases, the LM head) come first, in shards of
their own: plain safetensors files whose header metadata is exactly ``dppa_shared = "1"`` (``SHARED_METADATA``),
every zero stored as +0.0, nothing else in the header that depends on the artifact. Extract, prune and amplify write
such a shard byte for byte the same way for the same tensors, so prune and amplify hard-link it from their input
delta instead of writing it again, and DVC stores it once for the delta and its pruned and amplified deltas.
Amplification multiplies the out-of-scope tensors by the largest factor (docs/method.md); its delta keeps the
unscaled shared shard and its `model.safetensors.index.json` says, under ``metadata.dppa_scale`` ({file name: factor
as a JSON number}), that a reader returns that file's tensors as ``scaled(values, factor)``: the product computed in
float32, rounded to the stored dtype, zeros as +0.0, the very arithmetic amplification used to do on them.
Version 2 adds shared shards and scales; version 1 files (no shared shard) read as before.

Zero tensors. A tensor that is exactly zero (a module a LoRA adapter leaves alone, an embedding a fine-tune froze)
takes no bytes in any delta file, shared shards included: it is left out of the file's tensor table and listed in
its header metadata under ``dppa_zero`` (``ZERO_KEY``), a JSON object NAME -> [safetensors dtype, dense shape].
Readers return zeros of that dtype and shape. The list is a function of the tensors alone, so a shared shard with
zero tensors is still written byte for byte alike by extract, prune and amplify.
"""

from __future__ import annotations

import json
import math

import torch

from dppa.io.safetensors_format import DTYPE_NAMES

FORMAT = "sparse-bitmask"
VERSION = 2
READABLE_VERSIONS = ("1", "2")
SHARED_METADATA = {"dppa_shared": "1"}
ZERO_KEY = "dppa_zero"  # header metadata: {name: [dtype, shape]} of the file's exactly-zero tensors, stored as nothing
SCALE_KEY = "dppa_scale"  # under the index's "metadata": {file name: factor} of shared shards read scaled
BLOCK = 1 << 16  # elements per entry of NAME::counts: the most mask bits a range read must count itself
SEP = "::"
PARTS = ("counts", "mask", "values")
BITS = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def part_name(name: str, part: str) -> str:
    return f"{name}{SEP}{part}"


def mask_bytes(numel: int) -> int:
    return math.ceil(numel / 64) * 8


def block_count(numel: int) -> int:
    return math.ceil(numel / BLOCK)


def sparse_nbytes(numel: int, kept: int, dtype: torch.dtype) -> int:
    return 8 * block_count(numel) + mask_bytes(numel) + kept * dtype.itemsize


def same_size_int(dtype: torch.dtype) -> torch.dtype:
    return _SAME_SIZE_INT[dtype.itemsize]


_ADD_ZERO = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def positive_zeros(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (a new one) with every zero (-0.0 included) as +0.0, the only zero the delta writers store."""
    if tensor.dtype in _ADD_ZERO:  # x + 0.0 is x, and +0.0 for -0.0 (IEEE): one pass, 4x torch.where's speed
        return tensor + 0.0
    return torch.where(tensor == 0, torch.zeros((), dtype=tensor.dtype), tensor)


def scaled(values: torch.Tensor, factor: float, *, inplace: bool = False) -> torch.Tensor:
    """`values` (zeros stored as +0.0) times `factor`, computed in float32 and rounded to their dtype, zeros as +0.0
    (see above); `inplace` overwrites `values` when its dtype allows (a buffer the caller owns)."""
    if values.dtype in (torch.bfloat16, torch.float16, torch.float32):  # torch multiplies in float32, rounds once
        product = (values if inplace else values.clone()).mul_(factor)
        # |product| >= |value| for factor >= 1, so no product is a new zero, let alone -0.0 (half the time of add_)
        return product if factor >= 1.0 else product.add_(0.0)
    product = values.to(torch.float32).mul_(factor).to(values.dtype)
    return product.add_(0.0) if product.dtype in _ADD_ZERO else positive_zeros(product)


def kept_mask(flat: torch.Tensor) -> torch.Tensor:
    """True where an element's bits are not all zero (the elements the sparse layout stores)."""
    return flat.view(same_size_int(flat.dtype)) != 0


def encode(tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """The three stored tensors of `tensor` (CPU), or None when the sparse layout would not be smaller."""
    flat = tensor.detach().reshape(-1).contiguous()
    numel = flat.numel()
    kept = kept_mask(flat)
    n_kept = int(kept.sum())
    if sparse_nbytes(numel, n_kept, flat.dtype) >= numel * flat.element_size():
        return None
    padded = torch.zeros(mask_bytes(numel) * 8, dtype=torch.bool)
    padded[:numel] = kept
    mask = (padded.view(-1, 8).to(torch.uint8) * BITS).sum(1, dtype=torch.uint8)
    per_block = torch.zeros(block_count(numel) * BLOCK, dtype=torch.int64)
    per_block[:numel] = kept
    per_block = per_block.view(-1, BLOCK).sum(1)
    counts = torch.cumsum(per_block, 0) - per_block  # kept before each block
    return {"counts": counts, "mask": mask, "values": flat[kept]}


def zero_metadata(zeros: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> dict[str, str]:
    """The header metadata listing a file's zero tensors (none: no key)."""
    if not zeros:
        return {}
    listed = {name: [DTYPE_NAMES[dtype], list(shape)] for name, dtype, shape in zeros}
    return {ZERO_KEY: json.dumps(listed, separators=(",", ":"), sort_keys=True)}


def is_zero(tensor: torch.Tensor) -> bool:
    """Whether every element is zero (either sign)."""
    return tensor.numel() == 0 or not bool(tensor.reshape(-1).ne(0).any())


def header_metadata(shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """The safetensors metadata that marks a file as sparse and gives each sparse tensor's dense shape."""
    return {
        "dppa_format": FORMAT,
        "dppa_format_version": str(VERSION),
        "dppa_block": str(BLOCK),
        "dppa_sparse": json.dumps({n: list(s) for n, s in shapes.items()}, separators=(",", ":")),
    }
