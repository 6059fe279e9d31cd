"""Running one DVC stage: `dvc repro --single-item STAGE`, so DVC still decides whether it is stale and records
dvc.lock. DVC releases its repository lock while a stage's command runs, so several of these run in parallel;
`--wait-for-lock` makes them queue for the short locked parts (status check, lock-file update)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import get_run_logger, task

from dppa.errors import DppaError


def dvc_command() -> list[str]:
    return [sys.executable, "-m", "dvc"]


def stage_environment() -> dict[str, str]:
    """The environment with this interpreter's bin folder first on PATH, so that the stage commands (`dppa stage`)
    resolve to this installation even on a Dask worker or under `make`, whose PATH may lack the virtualenv."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def is_progress_bar(line: str) -> bool:
    return "it/s]" in line or "B/s]" in line or "%|" in line


@task(task_run_name="{stage}")
def repro_stage(root: Path, stage: str) -> str:
    """Returns "ran", "restored" (outputs checked out from DVC's run cache: the same inputs ran before) or
    "up to date". The stage's output is logged as it comes (progress bars left out)."""
    logger = get_run_logger()
    command = [*dvc_command(), "--wait-for-lock", "repro", "--single-item", stage]
    ran = restored = False
    with subprocess.Popen(command, cwd=root, env=stage_environment(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        for line in process.stdout:
            line = line.rstrip()
            ran = ran or line.startswith(f"Running stage '{stage}'")
            restored = restored or line.startswith(f"Stage '{stage}' is cached")
            if line and not is_progress_bar(line):
                logger.info(line)
    if process.returncode != 0:
        raise DppaError(f"stage {stage} failed (dvc repro exit {process.returncode}); see its log above")
    return "ran" if ran else "restored" if restored else "up to date"
