"""The pipeline runs that each take their own copy of the session's built project (tests/helpers/pipeline.py's
`built_once`): the experiment grid and the Dask LocalCluster (runs killed mid-stage: tests/test_pipeline_kills.py).
Apart from tests/test_pipeline.py so that pytest-xdist runs the files side by side on one build.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import time

import pytest

from dppa.pipeline.stage_client import SERVER_ENV
from tests.helpers.pipeline import (
    ALL_STAGES,
    FINETUNES,
    artifact_contents,
    built_once,
    dvc,
    edit_params,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_zoo, prefect_api, stage_server):
    """(the session's built project, not to be changed, and its artifact contents)"""
    return built_once(tmp_path_factory, tiny_zoo, stage_server)


def test_experiment_grid_runs_each_point_as_a_dvc_experiment(built, tmp_path, stage_server, monkeypatch):
    from dppa.pipeline.grid import points, recorded, run_grid

    monkeypatch.setenv(SERVER_ENV, stage_server)  # the points' stages fork the warm server (run_grid's DVC inherits it)
    project = tmp_path / "grid"
    shutil.copytree(built[0], project, symlinks=True)
    identity = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    for command in (["git", "add", "-A"], ["git", "commit", "-qm", "baseline"]):
        subprocess.run(command, cwd=project, check=True, env={**os.environ, **identity})
    params_before = (project / "params.yaml").read_text()
    spec = {
        "seeds": [{"prune.seed": 0}],
        "grids": {
            "pruning": {"table": "finetunes", "axes": {"prune.method": ["magnitude", "dare"]}, "targets": ["score"]}
        },
    }
    log = []
    os.environ.update(identity)
    run_grid(spec, ["pruning"], project, tmp_path / "results", where={"prune.method": "dare"}, log=log.append)
    assert len([line for line in log if "done in" in line]) == 1  # the slice: dare's point
    log.clear()
    results = run_grid(spec, ["pruning"], project, tmp_path / "results", log=log.append)
    expected = points(spec, "pruning")
    assert len(expected) == 2
    assert len([line for line in log if "done in" in line]) == 1 and len([x for x in log if "skipped" in x]) == 1
    shown = json.loads(dvc(project, "exp", "show", "--json").stdout)
    assert (project / "params.yaml").read_text() == params_before  # the workspace's params are put back
    # DVC recorded each point with its overrides and the per-fine-tune metrics of the score stage
    metrics = recorded(project)
    for point in expected:
        record = metrics[point["name"]][f"data/metrics/finetunes/{FINETUNES[0]}.json"]
        assert record["method"] == point["overrides"]["prune.method"]
    assert all(p["name"] in json.dumps(shown) for p in expected)
    text = results.read_text()
    assert re.search(r"## pruning \(2 of 2 points; 2 timed, [\d.]+ (min|h) of wall\)", text)
    assert "| finetune | magnitude 0.2 | dppa 0.2 | dare 0.2 |" in text
    rows = list(csv.DictReader((tmp_path / "results" / "pruning.csv").open()))
    assert len(rows) == 2 * len(FINETUNES) * 2  # points x fine-tunes x (pruned, amplified)
    # a rerun finds every point recorded and runs nothing
    log.clear()
    run_grid(spec, ["pruning"], project, tmp_path / "results", log=log.append)
    assert log == [f"{p['name']}: recorded, skipped" for p in expected]
    # A later sitting (a fresh clone, another commit): DVC's experiments are gone, the committed points.jsonl is
    # what remains, and it alone says which points are done and what they scored
    logged = [json.loads(line) for line in (tmp_path / "results" / "points.jsonl").read_text().splitlines()]
    assert sorted(entry["name"] for entry in logged) == sorted(p["name"] for p in expected)
    assert all(entry["metrics"] == metrics[entry["name"]] for entry in logged)
    assert all(entry["seconds"] > 0 for entry in logged)  # each point's wall time, for a grid's total
    dvc(project, "exp", "remove", "--all-commits")
    assert not set(recorded(project)) & {p["name"] for p in expected}
    log.clear()
    results = run_grid(spec, ["pruning"], project, tmp_path / "results", log=log.append)
    assert log == [f"{p['name']}: recorded, skipped" for p in expected]
    assert results.read_text() == text


def test_dask_local_cluster_gives_the_same_artifacts_as_plain_dvc_repro(built, tmp_path, capsys):
    """The whole pipeline on a Dask LocalCluster of two processes, from nothing, writes the same bytes as the
    session's built project's plain `dvc repro` (one full run fewer than running the threads path again)."""
    from dppa.cli.run import run_pipeline

    project = tmp_path / "project"
    shutil.copytree(built[0], project, symlinks=True)
    edit_params(project, lambda p: p["runtime"].update(task_runner="local-cluster:2"))
    # Start from nothing, DVC's run cache (.dvc/cache/runs) included, so that every stage really runs.
    for produced in ("dvc.lock", "data", ".dvc/cache"):
        target = project / produced
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    started = time.perf_counter()
    outcome, _outputs = run_pipeline(project)
    wall = time.perf_counter() - started
    assert set(outcome) == ALL_STAGES and set(outcome.values()) == {"ran"}
    with capsys.disabled():
        print(f"\npipeline wall time, 2 fine-tunes, Dask LocalCluster(2 processes): {wall:.1f} s")
    assert artifact_contents(project, relocatable=True) == built[1]
    assert "Data and pipelines are up to date" in dvc(project, "status").stdout
