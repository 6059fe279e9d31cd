"""How the pipeline starts DVC: this interpreter's `dvc`, with this installation's `dppa` first on PATH."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def dvc_command() -> list[str]:
    return [sys.executable, "-m", "dvc"]


def stage_environment() -> dict[str, str]:
    """The environment with this interpreter's bin folder first on PATH, so that the stage commands (`dppa stage`)
    resolve to this installation even on a Dask worker or under `make`, whose PATH may lack the virtualenv."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env
