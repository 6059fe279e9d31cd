"""Atomic output folders: write into a temporary sibling, rename into place only when complete.

A crash, an error or Ctrl-C leaves either the previous folder or nothing, never a half-written artifact.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from dppa.errors import DppaError
from dppa.io.space import check_free_space, disk_full_error


def link_or_copy(source: Path, target: Path) -> None:
    """`target` made a hard link of `source` (the same bytes at no cost), or a copy across filesystems or where
    links are not allowed. Only for files that nobody writes in place."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def check_output_free(out: Path, overwrite: bool) -> None:
    """Fail early (before any work) when `out` exists and the user did not ask to replace it."""
    if out.exists() and not overwrite:
        raise DppaError(f"{out}: output folder already exists; choose another path or pass --overwrite")


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False, needed_bytes: int | None = None):
    """Yield a fresh temporary folder next to `out`; on success it becomes `out`.

    `needed_bytes`: the output's expected size, checked against the disk's free space before anything is written
    (the old folder, when replaced, stays until the rename, so it does not count as free)."""
    out = Path(out)
    check_output_free(out, overwrite)
    if needed_bytes is not None:
        check_free_space(out, needed_bytes)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full_error(exc, out)
        if full is None:
            raise
        raise full from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        # Move the old folder aside first so that at every instant `out` is either old or new, never missing data.
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    """Write the file ``path`` whole or not at all (a temporary sibling, then one rename)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise DppaError(f"{path}: already exists; choose another path or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
