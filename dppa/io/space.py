"""Disk space: refuse a write up front when the output's folder cannot hold it, and turn a disk that fills during
the write (another writer) into one line instead of a traceback."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from dppa.errors import DppaError

# Room for the files beside the tensors (manifest, config, tokenizer, card, index) and the file system's rounding.
MARGIN_BYTES = 1 << 20
MARGIN_SHARE = 0.01


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def existing_parent(path: Path) -> Path:
    """The nearest folder of `path` that exists (the output's parents may not exist yet)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(existing_parent(path)).free


def check_free_space(out: Path, needed: int) -> None:
    """Refuse, before any byte is written, an output of about `needed` bytes that its folder's disk cannot hold."""
    free, needed = free_bytes(Path(out).parent), int(needed * (1 + MARGIN_SHARE)) + MARGIN_BYTES
    if needed > free:
        raise DppaError(
            f"{Path(out).parent}: {Path(out).name} needs about {human_bytes(needed)} but the disk has "
            f"{human_bytes(free)} free; free some space or write the output elsewhere"
        )


def same_disk(a: Path, b: Path) -> bool:
    return os.stat(existing_parent(a)).st_dev == os.stat(existing_parent(b)).st_dev


def disk_full_error(exc: OSError, out: Path) -> DppaError | None:
    """The one-line error for a disk that filled (or a quota hit) while writing `out`; None for other errors."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    return DppaError(
        f"{Path(out).parent}: the disk filled while writing {Path(out).name} (another writer?); nothing was kept; "
        "free some space and run again"
    )
