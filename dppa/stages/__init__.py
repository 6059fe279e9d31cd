"""The pipeline's stages as plain functions: `dppa stage NAME --ARG PATH ...` (the command each dvc.yaml stage runs)
calls STAGES[NAME](params, root, **paths) with the checked params and the paths dvc.yaml passes. The paths are
written in dvc.yaml only; each function's signature after (params, root) is its command line
(dppa/cli/stage.py builds the options from it). No orchestration here: `dvc repro` runs these alone, and the
pipeline flow (flows/pipeline.py) runs them through DVC as one Prefect task each.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from dppa.stages.deltas import amplify, extract, prune
from dppa.stages.evaluation import evaluate, publish, report, score
from dppa.stages.merge import merge
from dppa.stages.models import fetch, zoo

STAGES: dict[str, Callable] = {
    "zoo": zoo,
    "fetch": fetch,
    "extract": extract,
    "prune": prune,
    "amplify": amplify,
    "score": score,
    "merge": merge,
    "evaluate": evaluate,
    "report": report,
    "publish": publish,
}


def stage_arguments(stage: Callable) -> list[inspect.Parameter]:
    """A stage's arguments after (params, root): its command-line options."""
    return list(inspect.signature(stage).parameters.values())[2:]
