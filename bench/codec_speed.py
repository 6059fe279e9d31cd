"""Speed of the sparse decoding kernels (dppa/io/codec.py): ns per dense element to expand one chunk, compiled
(dppa/io/_codec.c) against the numpy fallback, and a plain copy of the dense chunk as the yardstick.

    python bench/codec_speed.py [--elements 262144] [--density 0.2] [--repeats 200]

One thread, best of --repeats, the chunk size the merge reads (2^18 elements); the mask is random at --density.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dppa.io import codec  # noqa: E402


def best_ns(fn, elements: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / elements * 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--elements", type=int, default=1 << 18)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    n = args.elements
    rng = np.random.default_rng(0)
    keep = rng.random(n) < args.density
    mask = np.packbits(keep, bitorder="little")
    kernels = {"numpy": (codec.count_kept_numpy, codec.expand_numpy)}
    if codec.COMPILED:
        from dppa.io import _codec

        kernels["compiled"] = (_codec.count_kept, _codec.expand)
    print(f"{n} elements, density {args.density}, best of {args.repeats}; ns per dense element")
    print(f"{'dtype':8} {'kernel':9} {'expand':>7} {'count':>7} {'copy':>7}")
    for dtype in (np.uint16, np.uint32):  # bf16 / fp16 and fp32, moved as integers
        values = rng.integers(1, 1 << 15, int(keep.sum())).astype(dtype)
        dense = np.zeros(n, dtype)
        dense[keep] = values
        out = np.empty(n, dtype)
        copy = best_ns(lambda d=dense: d.copy(), n, args.repeats)
        for name, (count_kept, expand) in kernels.items():
            expand(mask, 0, values, out, out.itemsize)
            assert np.array_equal(out, dense)
            ns = best_ns(lambda e=expand, v=values, o=out: e(mask, 0, v, o, o.itemsize), n, args.repeats)
            count = best_ns(lambda c=count_kept: c(mask, 0, n), n, args.repeats)
            label = {2: "16-bit", 4: "32-bit"}[out.itemsize]
            print(f"{label:8} {name:9} {ns:7.3f} {count:7.3f} {copy:7.3f}")


if __name__ == "__main__":
    main()
