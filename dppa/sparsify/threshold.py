"""Magnitude thresholds in O(n) by radix selection: exact top-k without sorting, streamable chunk by chunk.

The bit pattern of a float with its sign bit cleared is an integer that orders like the float's magnitude. So the
k-th largest magnitude is found from histograms of those integers ("keys"): one pass for 16-bit dtypes (bf16, fp16:
32768 possible magnitudes, int16 keys, counted by the compiled loop of dppa/io/codec.py where it was built), two
`bincount` passes for float32 (high 15 bits, then low 16 bits inside the chosen bin). Each pass can run over chunks
read from disk, so no full-tensor float32 copy is needed to find a threshold.

Ties at the threshold are broken by lowest flat index, so the kept set for a smaller k is always a subset of the kept
set for a larger k (DP's nested bands rely on it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from dppa.io.codec import histogram15

LOW_BITS = 16
LOW_MASK = (1 << LOW_BITS) - 1
TIE_GROUP_ELEMS = 1 << 20  # entries per kept histogram when placing the cutoff among ties (see find_threshold)
CHUNK_ELEMS = 1 << 20  # cache-friendly pieces whose buffers the allocator reuses (no page faults per pass)


def keep_count(density: float, numel: int) -> int:
    """Entries kept at `density` (spec: round(rho * n)); Python rounds halves to even."""
    return max(0, min(numel, int(round(density * numel))))


def key_bits(dtype: torch.dtype) -> int:
    return 15 if dtype in (torch.bfloat16, torch.float16) else 31


def magnitude_keys(values: torch.Tensor) -> torch.Tensor:
    """Integer keys ordered like |values| (flat): int16 for bf16 and fp16 (widening them to int32 cost more than the
    histogram), int32 otherwise; NaN sorts above Inf (inputs are checked finite at extraction)."""
    flat = values.reshape(-1)
    if flat.dtype in (torch.bfloat16, torch.float16):
        return flat.view(torch.int16).bitwise_and(0x7FFF)
    if flat.dtype != torch.float32:
        flat = flat.float()
    return flat.view(torch.int32).bitwise_and(0x7FFFFFFF)


def _in_range(keys: torch.Tensor, key: int) -> int:
    """`key` as compared with `keys`: a Python int beyond int16 would wrap against int16 keys (0x7FFFFFFF, KEEP_NONE's
    key, would become -1), and no int16 key exceeds 0x7FFF."""
    return min(key, 0x7FFF) if keys.dtype == torch.int16 else key


def _histogram(keys: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of each key value in [0, bins)."""
    if histogram15 is not None and keys.dtype == torch.int16 and keys.device.type == "cpu" and bins >= 1 << 15:
        hist = torch.zeros(bins, dtype=torch.int64)
        histogram15(keys.contiguous().numpy(), hist.numpy())  # keys are non-negative: the same counts
        return hist
    return torch.bincount(keys, minlength=bins)


def _bin_of_kth(hist: torch.Tensor, k: int) -> tuple[int, int, int]:
    """(bin holding the k-th largest item, items in higher bins, items in that bin)."""
    from_top = hist.flip(0).cumsum(0)
    pos = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype)))
    b = hist.numel() - 1 - pos
    return b, int(from_top[pos]) - int(hist[b]), int(hist[b])


@dataclass(frozen=True)
class Threshold:
    """Keep entries whose key is > `key`, plus those equal to it at flat index < `tie_cutoff`."""

    key: int
    tie_cutoff: int

    def mask(self, keys: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Keep-mask of a chunk of keys beginning at flat index `start`."""
        key = _in_range(keys, self.key)
        keep = keys > key
        end = min(keys.numel(), self.tie_cutoff - start)
        if end > 0:
            keep[:end] |= keys[:end] == key
        return keep

    def keep_in_(self, values: torch.Tensor, keys: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Zero, in place, the entries of a float32 chunk that `mask` drops; returns `values`. Integer arithmetic
        only: boolean kernels are several times slower on CPU."""
        bits, key = values.view(torch.int32), _in_range(keys, self.key)
        end = max(0, min(keys.numel(), self.tie_cutoff - start))
        bits[:end].bitwise_and_(_all_ones_where_greater(keys[:end], key - 1))  # ties kept before the cutoff
        bits[end:].bitwise_and_(_all_ones_where_greater(keys[end:], key))  # int16 masks widen with their sign
        return values


def _all_ones_where_greater(keys: torch.Tensor, key: int) -> torch.Tensor:
    """-1 (every bit set) where keys > key, else 0, in the keys' dtype; keys in [0, max] and key in [-1, max] for the
    dtype's max, so key - keys cannot overflow and is negative exactly where keys > key."""
    return torch.sub(key, keys).bitwise_right_shift_(keys.element_size() * 8 - 1)


KEEP_ALL = Threshold(-1, 0)
KEEP_NONE = Threshold(0x7FFFFFFF, 0)  # no int32 key is larger


def find_threshold(
    key_chunks: Callable[[], Iterable[torch.Tensor]],
    numel: int,
    k: int,
    bits: int,
    chunk_at: Callable[[int], torch.Tensor] | None = None,
    counted: CountedChunks | None = None,
) -> Threshold:
    """Exact threshold keeping the k largest keys; `key_chunks()` yields the keys in order, and may be called up to
    three times (histogram passes, then a scan to place the cutoff among ties).

    `chunk_at(i)`, when given, returns the i-th chunk that `key_chunks()` yields: the last histogram pass then
    keeps a histogram per group of chunks (about TIE_GROUP_ELEMS entries), and the cutoff among ties is placed by
    reading the chunks of the one group it falls in, not by scanning every chunk before it.

    `counted`, for 16-bit keys: the histograms and the ties of those chunks, counted without making the keys (by
    a fused kernel); `key_chunks` and `chunk_at` are then not called."""
    if k >= numel:
        return KEEP_ALL
    if k <= 0:
        return KEEP_NONE
    grouped = chunk_at is not None or counted is not None
    groups: list[tuple[int, int, torch.Tensor]] | None = [] if grouped else None  # (chunks, numel, hist)
    sizes = []  # of each chunk

    def histogram(chunks) -> torch.Tensor:
        """The sum of (size, histogram) of each chunk; with `groups`, one sum per group of chunks too."""
        total, group = None, None
        for size, hist in chunks:
            sizes.append(size)
            if groups is not None:
                if group is None or group[1] >= TIE_GROUP_ELEMS:
                    group = [0, 0, torch.zeros_like(hist)]
                    groups.append(group)
                group[0], group[1] = group[0] + 1, group[1] + size
                group[2].add_(hist)
            total = torch.zeros_like(hist) if total is None else total
            total.add_(hist)  # not kept: a `counted` kernel may reuse the chunk's histogram
        return total

    if bits <= LOW_BITS:
        if counted is not None:
            counts = counted.histograms()
        else:
            counts = ((c.numel(), _histogram(c, 1 << LOW_BITS)) for c in key_chunks())
        key, above, equal = _bin_of_kth(histogram(counts), k)
    else:
        high = sum(torch.bincount(c >> LOW_BITS, minlength=1 << (bits - LOW_BITS)) for c in key_chunks())
        high_bin, above, _ = _bin_of_kth(high, k)
        in_bin = ((c.numel(), c[(c >> LOW_BITS) == high_bin] & LOW_MASK) for c in key_chunks())
        low = histogram((size, _histogram(low_keys, 1 << LOW_BITS)) for size, low_keys in in_bin)
        low_bin, above_low, equal = _bin_of_kth(low, k - above)
        key, above = (high_bin << LOW_BITS) | low_bin, above + above_low
    if k - above == equal:  # every tie is kept: no need to find where the cutoff falls
        return Threshold(key, numel)
    if groups is None:
        return Threshold(key, _tie_cutoff(key_chunks, key, k - above))
    bin_of_key = key & LOW_MASK  # the bin `key` fell in, in the last histogram
    ties_kept, first_chunk, start = k - above, 0, 0
    for n_chunks, size, hist in groups:
        ties = int(hist[bin_of_key])
        if ties >= ties_kept:
            chunks = range(first_chunk, first_chunk + n_chunks)
            if counted is not None:
                return Threshold(key, start + _counted_tie_cutoff(counted, chunks, sizes, key, ties_kept))
            return Threshold(key, start + _tie_cutoff(lambda c=chunks: map(chunk_at, c), key, ties_kept))
        ties_kept, first_chunk, start = ties_kept - ties, first_chunk + n_chunks, start + size
    raise AssertionError("fewer ties than counted")  # unreachable: the histogram counted them


@dataclass(frozen=True)
class CountedChunks:
    """What a fused kernel counts of a tensor's 16-bit keys, chunk by chunk, without making them: `histograms()`
    gives each chunk's (size, histogram over 1 << 16 bins) in order; `ties(i, key, nth)` gives (the index in chunk
    i just past its nth key equal to `key`, or -1 when it has fewer; how many it counted, nth at most)."""

    histograms: Callable[[], Iterable[tuple[int, torch.Tensor]]]
    ties: Callable[[int, int, int], tuple[int, int]]


def _counted_tie_cutoff(counted: CountedChunks, chunks: range, sizes: list[int], key: int, ties_kept: int) -> int:
    """Index, from the first of `chunks`, just past the `ties_kept`-th entry equal to `key` in them."""
    start = 0
    for i in chunks:
        end, seen = counted.ties(i, key, ties_kept)
        if end >= 0:
            return start + end
        ties_kept, start = ties_kept - seen, start + sizes[i]
    raise AssertionError("fewer ties than counted")  # unreachable: the histogram counted them


def _tie_cutoff(key_chunks, key: int, ties_kept: int) -> int:
    """Flat index just past the `ties_kept`-th entry equal to `key`."""
    start = 0
    for chunk in key_chunks():
        ties = (chunk == key).nonzero().reshape(-1)
        if ties.numel() >= ties_kept:
            return start + int(ties[ties_kept - 1]) + 1
        ties_kept -= ties.numel()
        start += chunk.numel()
    raise AssertionError("fewer ties than counted")  # unreachable: the histogram counted them


def topk_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly k entries with the largest values; ties go to the lowest flat index."""
    flat = magnitude.reshape(-1)
    pieces = flat.split(CHUNK_ELEMS)
    threshold = find_threshold(
        lambda: map(magnitude_keys, pieces), flat.numel(), k, key_bits(flat.dtype), lambda i: magnitude_keys(pieces[i])
    )
    mask = torch.empty(flat.shape, dtype=torch.bool, device=flat.device)
    for start, piece in zip(range(0, flat.numel(), CHUNK_ELEMS), pieces):
        mask[start : start + piece.numel()] = threshold.mask(magnitude_keys(piece), start)
    return mask.view(magnitude.shape)
