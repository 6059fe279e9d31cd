"""The params check of `dppa run`, on the other core while the run asks DVC what is stale.

Both are CPU work in Python: the check imports torch through the registries (about 1.6 s on a 2-core machine), DVC
parses dvc.yaml and dvc.lock and checks every stage (about 2 s for the demo project). Done one after the other,
they made a run with nothing to do take twice as long as a no-op `dvc repro`; side by side it takes about as long
as the longer of the two. The check runs in a forked child that reports the outcome through a pipe; where there is
no fork, or this process already has threads (forking them is unsafe), it runs here, first, as it did.

What the check decides before any stage runs is unchanged: a bad params.yaml fails the run, naming every problem.
Only the run lock is taken before the answer comes, with the file's own `runtime.on_overlap` (read without the
check; "fail" when it is not one of the choices, which the check then reports).
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import yaml

from dppa.errors import DppaError
from dppa.pipeline.run_lock import ON_OVERLAP


def unchecked_runtime(root: str | os.PathLike) -> dict:
    """params.yaml's runtime section as written, unchecked ({} when unreadable): what a run needs before its check
    (on_overlap), or to report a params.yaml that fails it (notify)."""
    try:
        runtime = (yaml.safe_load((Path(root) / "params.yaml").read_text()) or {}).get("runtime")
    except (OSError, yaml.YAMLError, AttributeError):
        runtime = None
    return runtime if isinstance(runtime, dict) else {}


def on_overlap(root: Path) -> str:
    """runtime.on_overlap as params.yaml writes it (unchecked), "fail" when unset or not a choice."""
    value = unchecked_runtime(root).get("on_overlap")
    return value if value in ON_OVERLAP else "fail"


class ParamsCheck:
    """`check(root)`, started now (in a child when it can be), its outcome from `result()`. `check` checks
    params.yaml as the run needs it, raising DppaError naming the problems, and returns whether a model follows a
    hub branch (then only the flow can tell what is stale)."""

    def __init__(self, root: Path, check: Callable[[Path], bool]):
        self.root = root
        self.check = check
        self._child: int | None = None
        self._outcome: dict = {}
        if hasattr(os, "fork") and threading.active_count() == 1:
            self._fork()
        else:
            self._outcome = self._run()

    def _run(self) -> dict:
        try:
            return {"follows": self.check(self.root)}
        except DppaError as error:
            return {"error": str(error)}

    def _fork(self) -> None:
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: check, report, and leave without running anything of the parent's
            code = 1
            try:
                os.close(reader)
                with os.fdopen(writer, "w") as pipe:
                    pipe.write(json.dumps(self._run()))
                code = 0
            finally:
                os._exit(code)
        os.close(writer)
        self._child, self._reader = pid, reader

    def result(self) -> bool:
        """Whether a model follows a hub branch; raises the check's DppaError. A child that ended without an
        answer (an unexpected error) is checked again here, so that the error surfaces as it would have."""
        if self._child is not None:
            with os.fdopen(self._reader) as pipe:
                body = pipe.read()
            os.waitpid(self._child, 0)
            self._child = None
            self._outcome = json.loads(body) if body else {"follows": self.check(self.root)}
        if "error" in self._outcome:
            raise DppaError(self._outcome["error"])
        return self._outcome["follows"]

    def cancel(self) -> None:
        """End the child if its answer was not asked for (the run ended before it: the lock was held, Ctrl-C)."""
        if self._child is not None:
            os.kill(self._child, signal.SIGKILL)
            os.waitpid(self._child, 0)
            os.close(self._reader)
            self._child = None
