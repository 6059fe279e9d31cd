"""Child processes that end when the process that started them ends, even when it is killed with SIGKILL.

A pipeline run starts a temporary Prefect API server and one `dvc repro` per stage, and DVC starts the stage
command. If `dppa run` is killed (an out-of-memory killer, a lost terminal), nothing in it can clean up, so each
child asks the kernel beforehand (Linux `PR_SET_PDEATHSIG`) to send it SIGTERM when its parent goes. The chain
`dppa run` -> `dvc repro` -> `dppa stage` then unwinds link by link. Elsewhere than Linux this is a no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM, expected_parent: int | None = None) -> None:
    """Ask for `sig` when the parent process ends; exit now if it has already ended (it may die before this)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)


def lifeline_preexec() -> None:
    """For `subprocess.Popen(preexec_fn=...)`: runs in the child between fork and exec."""
    die_with_parent(expected_parent=_PARENT)


_PARENT = os.getpid()


def popen(*args, **kwargs) -> subprocess.Popen:
    """`subprocess.Popen` whose child gets SIGTERM when this process ends."""
    global _PARENT
    _PARENT = os.getpid()
    return subprocess.Popen(*args, preexec_fn=lifeline_preexec, **kwargs)


@contextlib.contextmanager
def children_die_with_us() -> Iterator[None]:
    """Within the block, every `subprocess.Popen` started by this thread's callee (e.g. a library that starts a
    server and offers no hook for it) gets the lifeline. Used only around such a call, when no other thread starts
    processes."""
    global _PARENT
    _PARENT = os.getpid()
    original = subprocess.Popen

    class LifelinePopen(original):  # a subclass, so isinstance checks and Popen[...] still work
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("preexec_fn", lifeline_preexec)
            super().__init__(*args, **kwargs)

    subprocess.Popen = LifelinePopen  # type: ignore[misc]
    try:
        yield
    finally:
        subprocess.Popen = original  # type: ignore[misc]
