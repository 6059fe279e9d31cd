"""Decoding sparse deltas fast (dppa/io/sparse.py): count the kept elements of a range of the bit mask, expand a
range into dense values. The compiled module also counts the 16-bit magnitudes behind every bf16 / fp16 threshold
(dppa/sparsify/threshold.py; without it, torch.bincount does).

The compiled module dppa/io/_codec.c does each in one pass (about 0.1 ns per element); the numpy functions here are
the same functions for an install that could not build it (no C compiler), about ten times slower. It also has four
kernels of `dppa merge` on bf16 checkpoints, with no fallback here (merge.py takes torch's path without them): the
histogram of a fine-tune's delta keys, the place of its cutoff among ties, and its trimmed delta in float32, each
computed from the fine-tune and the base in one pass, with the bits torch's `finetune.sub(base)` gives; and TIES's
combine onto a bf16 base, with the bits of dppa/merging/ties.py's torch code.
`COMPILED` says which ones this process uses; `DPPA_CODEC=python` forces the ones here.
"""

from __future__ import annotations

import os

import numpy as np

_SAME_SIZE_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _bytes(array) -> np.ndarray:
    return np.asarray(array).reshape(-1).view(np.uint8)


def _bits(mask, first: int, count: int) -> np.ndarray:
    """Mask bits [first, first + count) as booleans (bit i is bit i % 8 of byte i // 8)."""
    mask = _bytes(mask)
    if first < 0 or count < 0 or (first + count + 7) // 8 > mask.size:
        raise ValueError(f"bits [{first}, {first + count}) outside a mask of {mask.size} bytes")
    bits = np.unpackbits(mask[first // 8 : (first + count + 7) // 8], bitorder="little")
    return bits[first % 8 : first % 8 + count].view(bool)


def count_kept_numpy(mask: np.ndarray, first: int, count: int) -> int:
    """How many of mask bits [first, first + count) are set."""
    return int(np.count_nonzero(_bits(mask, first, count)))


def expand_numpy(mask: np.ndarray, first: int, values: np.ndarray, out: np.ndarray, size: int) -> None:
    """Write into `out` the dense range that starts at mask bit `first`: the next value where a bit is set, zero
    bytes elsewhere. `values` must hold exactly the kept elements (ValueError otherwise)."""
    out_bytes, value_bytes = _bytes(out), _bytes(values)
    kept = _bits(mask, first, out_bytes.size // size)
    n_kept = int(np.count_nonzero(kept))
    if n_kept * size != value_bytes.size:
        more = "more" if n_kept * size > value_bytes.size else "fewer"
        raise ValueError(f"the mask keeps {more} elements than the {value_bytes.size // size} values given")
    as_uint = _SAME_SIZE_UINT.get(size)  # move elements as integers (numpy has no bfloat16), or as rows of bytes
    dense = out_bytes.view(as_uint) if as_uint else out_bytes.reshape(-1, size)
    dense[...] = 0
    dense[np.flatnonzero(kept)] = value_bytes.view(as_uint) if as_uint else value_bytes.reshape(-1, size)


try:
    if os.environ.get("DPPA_CODEC") == "python":
        raise ImportError("DPPA_CODEC=python")
    from dppa.io._codec import count_kept, delta_histogram15, delta_ties, expand, histogram15, ties_bf16, trimmed_deltas

    COMPILED = True
except ImportError:
    count_kept, expand = count_kept_numpy, expand_numpy
    histogram15 = None  # the thresholds count with torch.bincount instead (numpy's is slower on int16)
    delta_histogram15 = delta_ties = ties_bf16 = trimmed_deltas = None  # merges take torch's path instead
    COMPILED = False
