"""Child processes that end when the process that started them ends, even when it is killed with SIGKILL.

A pipeline run starts a temporary Prefect API server and one `dvc repro` per stage, and DVC starts the stage
command. If `dppa run` is killed (an out-of-memory killer, a lost terminal), nothing in it can clean up, so each
child asks the kernel beforehand (Linux `PR_SET_PDEATHSIG`) to send it SIGTERM when its parent goes; the chain
`dppa run` -> `dvc repro` -> `dppa stage` then unwinds link by link. The request is made by a small launcher,
`python -m dppa.pipeline.lifeline PARENT_PID COMMAND...`, that then replaces itself with COMMAND (the request
survives exec), rather than in a `preexec_fn`, which is unsafe in a process with threads. Elsewhere than Linux
the launcher only execs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM, expected_parent: int | None = None) -> None:
    """Ask for `sig` when the parent process ends; exit now if it has already ended (it may die before this)."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)


def wrap(args: Sequence[str]) -> list[str]:
    """COMMAND as run through the launcher, bound to this process."""
    return [sys.executable, "-m", "dppa.pipeline.lifeline", str(os.getpid()), *map(str, args)]


def popen(args: Sequence[str], **kwargs) -> subprocess.Popen:
    """`subprocess.Popen` of a command (a list) whose process gets SIGTERM when this process ends."""
    return subprocess.Popen(wrap(args), **kwargs)


@contextlib.contextmanager
def children_die_with_us() -> Iterator[None]:
    """Within the block, every list command that `subprocess.Popen` starts goes through the launcher. For a library
    call that starts a server and offers no hook for it; no other thread may start processes meanwhile."""
    original = subprocess.Popen

    class LifelinePopen(original):  # a subclass, so isinstance checks and Popen[...] still work
        def __init__(self, args, *rest, **kwargs):
            super().__init__(wrap(args) if isinstance(args, (list, tuple)) else args, *rest, **kwargs)

    subprocess.Popen = LifelinePopen  # type: ignore[misc]
    try:
        yield
    finally:
        subprocess.Popen = original  # type: ignore[misc]


@contextlib.contextmanager
def terminated_as_interrupt():
    """Within the block, SIGTERM (`kill`, a scheduler's stop, a stopped grid) raises KeyboardInterrupt as Ctrl-C
    does, so the block's `finally` clauses and context managers run: Python's default SIGTERM ends the process
    without them, which left a stopped grid's overrides in the user's params.yaml and a stopped stage's temporary
    output folder behind."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"stopped by signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    die_with_parent(expected_parent=int(sys.argv[1]))
    os.execvp(sys.argv[2], sys.argv[2:])
