"""Where tensor math runs, and progress reporting for checkpoint walks."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm.auto import tqdm

from dppa.errors import DppaError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DppaError(f"--device {name}: no CUDA device is visible here; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise DppaError(f"--device {name}: unknown device; use auto, cpu or cuda")
    return torch.device(name)


class Progress:
    """A byte-counting progress bar that also shows tensors done; silent when disabled."""

    def __init__(self, desc: str, total_bytes: int, total_tensors: int, enabled: bool = True):
        self.total_tensors = total_tensors
        self.done = 0
        self.bar = tqdm(
            total=total_bytes,
            desc=desc,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=not enabled,
            dynamic_ncols=True,
            mininterval=0.5,
            leave=True,
        )

    def advance(self, nbytes: int) -> None:
        self.bar.update(nbytes)

    def tensor_done(self) -> None:
        self.done += 1
        self.bar.set_postfix_str(f"{self.done}/{self.total_tensors} tensors", refresh=False)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


PARALLEL_CHUNK_ELEMS = 1 << 18  # 1 MB of float32: a chunk's buffers stay in cache and are reused, not page-faulted


def worker_count() -> int:
    return max(1, min(os.cpu_count() or 1, torch.get_num_threads()))


MMAP_THRESHOLD = 32 << 20  # glibc's largest
TRIM_THRESHOLD = 256 << 20


@functools.cache
def reuse_freed_buffers() -> bool:
    """Make glibc's malloc keep freed buffers of up to MMAP_THRESHOLD for reuse; returns whether it could.

    By default an allocation above an adaptive threshold (the largest buffer freed so far) is mapped fresh and
    unmapped on free, and the heap is trimmed beyond twice that, so a loop that allocates and frees buffers of a few
    MB per chunk can get every one as new pages from the kernel: merging SmolLM2-135M faulted in about 1.5 GB that
    way (370,000 page faults, 1.2 s of system time). Fixed thresholds keep those buffers in the heap. Off glibc
    (macOS, musl) nothing changes."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))


@contextlib.contextmanager
def chunk_workers(workers: int | None = None):
    """A thread pool for chunk-parallel tensor math, with torch's own intra-op threading off meanwhile.

    Elementwise work on cache-sized chunks runs best one chunk per core: torch's OpenMP regions on such small
    tensors cost more in synchronisation than they gain, badly so on a busy machine.
    """
    workers = workers or worker_count()
    reuse_freed_buffers()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dppa-chunk") as pool:
            yield pool, workers
    finally:
        torch.set_num_threads(previous)


def ordered_map(pool: ThreadPoolExecutor, workers: int, fn, items, window: int | None = None):
    """fn over items on the pool, results in order, at most `window` (default 2 x workers) in flight."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= (window or 2 * workers):
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def chunk_ranges(numel: int, chunk_elems: int = PARALLEL_CHUNK_ELEMS):
    return [(start, min(chunk_elems, numel - start)) for start in range(0, numel, chunk_elems)]
