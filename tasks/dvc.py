"""Running one DVC stage: `dvc repro --single-item STAGE`, so DVC still decides whether it is stale and records
dvc.lock. DVC releases its repository lock while a stage's command runs, so several of these run in parallel;
`--wait-for-lock` makes them queue for the short locked parts (status check, lock-file update). Under `dppa run`
each is a fork of the run's stage server (dppa/pipeline/stage_server.py), which has imported DVC once."""

from __future__ import annotations

import collections
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from prefect import get_run_logger, task

from dppa.pipeline import lifeline
from dppa.pipeline.dvc_process import dvc_command, stage_environment
from dppa.pipeline.run_record import TAIL_LINES, StageFailed
from dppa.pipeline.stage_client import SERVER_ENV, WARM_ENV, run_dvc_through_server

PREFECT_INFO = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \| (?:DEBUG|INFO) ")


def is_progress_bar(line: str) -> bool:
    return "it/s]" in line or "B/s]" in line or "%|" in line


def tells_the_failure(line: str) -> bool:
    """Whether a line belongs in the short account of a failure: not a traceback's frames (indented), nor a
    Prefect info record; the exception's own line, the stage's error and DVC's verdict stay."""
    return not (line[:1].isspace() or line.startswith("Traceback (most recent call last)") or PREFECT_INFO.match(line))


def run_dvc(args: list[str], root: Path, on_line: Callable[[str], None]) -> int:
    """`dvc ARGS` in `root`, each line of its output handed to `on_line`; its exit status. Forked from the run's
    stage server, whose DVC is imported already (about 0.7 s a stage), when there is one; else its own process."""
    env = stage_environment()
    env.setdefault(WARM_ENV, "0")  # one stage per DVC process: a server of its own would serve nothing (the run's does)
    server = env.get(SERVER_ENV)
    returncode = run_dvc_through_server(args, server, root, env, on_line) if server else None
    if returncode is not None:
        return returncode
    # lifeline.popen: `dvc repro` (and through it the stage) ends when this run is killed
    with lifeline.popen(
        [*dvc_command(), *args], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        for line in process.stdout:
            on_line(line)
    return process.returncode


@task(task_run_name="{stage}")
def repro_stage(root: Path, stage: str, force: bool = False) -> str:
    """Returns "ran", "restored" (outputs checked out from DVC's run cache: the same inputs ran before) or
    "up to date". The stage's output is logged as it comes (progress bars left out); when it fails, StageFailed
    carries its last lines. `force` runs it even when DVC finds it up to date (a fetch whose hub branch moved)."""
    from dppa.flows.runtime import hide_run_tracebacks

    hide_run_tracebacks()  # also where the task runs in a Dask worker process
    logger = get_run_logger()
    args = ["--wait-for-lock", "repro", "--single-item", *(["--force"] if force else []), stage]
    ran = restored = False
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    started = time.perf_counter()

    def on_line(line: str) -> None:
        nonlocal ran, restored
        line = line.rstrip()
        ran = ran or line.startswith(f"Running stage '{stage}'")
        restored = restored or line.startswith(f"Stage '{stage}' is cached")
        if line and not is_progress_bar(line):
            logger.info(line)
            if tells_the_failure(line):
                tail.append(line)

    returncode = run_dvc(args, root, on_line)
    if returncode != 0:
        raise StageFailed(stage, returncode, list(tail))
    outcome = "ran" if ran else "restored" if restored else "up to date"
    logger.info(f"{stage}: {outcome} ({time.perf_counter() - started:.1f} s)")
    return outcome


@task(task_run_name="{stage}")
def up_to_date(stage: str) -> str:
    """A stage that DVC found up to date at the start of the run, none of whose upstream stages runs: no DVC
    process is started for it (one costs about 1.2 s, bench/README.md), and it still shows in the run as its own
    task."""
    get_run_logger().info(f"{stage}: up to date (dvc status at the start of the run)")
    return "up to date"
