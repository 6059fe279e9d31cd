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


@task(task_run_name="{stage}")
def repro_stage(root: Path, stage: str) -> str:
    """Returns "ran" or "up to date"."""
    logger = get_run_logger()
    done = subprocess.run([*dvc_command(), "--wait-for-lock", "repro", "--single-item", stage], cwd=root,
                          env=stage_environment(), capture_output=True, text=True)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        logger.error(output)
        raise DppaError(f"stage {stage} failed (dvc repro exit {done.returncode}); see the log above")
    ran = f"Running stage '{stage}'" in output
    logger.info(output.strip()[-4000:] if ran else f"{stage}: up to date")
    return "ran" if ran else "up to date"
