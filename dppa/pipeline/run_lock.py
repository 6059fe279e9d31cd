"""One pipeline run per project at a time.

`dppa run`, each scheduled run of `dppa serve` and `dppa stage` take this lock before any work. The lock is an
advisory `flock` on `.dvc/tmp/dppa-run.lock`: the kernel releases it when its holder dies, however it dies, so a
killed run never blocks the next one. Beside the lock, `dppa-run.json` names the holder (pid, host, start time,
command) so that a second run can say which run it met; a record whose process is gone is reported as taken over.

Stages started by a run (through `dvc repro`) inherit the run's token in DPPA_RUN_TOKEN and do not take the lock
again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from dppa.errors import DppaError

TOKEN_ENV = "DPPA_RUN_TOKEN"
ON_OVERLAP = ("wait", "skip", "fail")


class RunSkipped(Exception):
    """Another run holds the project and on_overlap is skip: nothing was done."""


def lock_paths(root: Path) -> tuple[Path, Path]:
    folder = Path(root) / ".dvc" / "tmp"
    return folder / "dppa-run.lock", folder / "dppa-run.json"


def read_holder(root: Path) -> dict | None:
    try:
        return json.loads(lock_paths(root)[1].read_text())
    except (OSError, json.JSONDecodeError):
        return None


def describe(holder: dict | None) -> str:
    if not holder:
        return "another run (no record)"
    return (
        f"{holder.get('command', 'a run')} (pid {holder.get('pid')} on {holder.get('host')}, "
        f"started {holder.get('started')})"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def run_lock(
    root: str | os.PathLike,
    *,
    on_overlap: str = "fail",
    command: str = "dppa run",
    poll_s: float = 2.0,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> Iterator[None]:
    """Hold the project's run lock for the block.

    on_overlap decides what happens when another run holds it: "wait" until it ends, "skip" (raise RunSkipped),
    or "fail" (raise DppaError naming the other run). Inside a run (DPPA_RUN_TOKEN set by the holder) this is a
    no-op, so stages started by the run do not wait for the run itself.
    """
    if on_overlap not in ON_OVERLAP:
        raise DppaError(f"runtime.on_overlap {on_overlap!r}: use one of {', '.join(ON_OVERLAP)}")
    root = Path(root)
    if os.environ.get(TOKEN_ENV):
        yield
        return
    lock_file, record_file = lock_paths(root)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as handle:
        announced = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = read_holder(root)
                if on_overlap == "fail":
                    raise DppaError(
                        f"{root}: {describe(holder)} is running on this project; wait for it to end "
                        "or set runtime.on_overlap: wait"
                    ) from None
                if on_overlap == "skip":
                    raise RunSkipped(f"{describe(holder)} is running on this project; this run was skipped") from None
                if not announced:
                    log(f"waiting for {describe(holder)} to end")
                    announced = True
                time.sleep(poll_s)
        previous = read_holder(root)
        if previous and previous.get("host") == socket.gethostname() and not _alive(int(previous.get("pid", 0))):
            log(f"taking over the run lock from {describe(previous)}, which is no longer running")
        token = uuid.uuid4().hex
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "token": token,
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        tmp = record_file.with_name(f".{record_file.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, record_file)
        os.environ[TOKEN_ENV] = token
        try:
            yield
        finally:
            os.environ.pop(TOKEN_ENV, None)
            with contextlib.suppress(OSError):
                record_file.unlink()
            fcntl.flock(handle, fcntl.LOCK_UN)
