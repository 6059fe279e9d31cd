"""The orchestrated pipeline on the tiny zoo, with real DVC, real Prefect (embedded API) and a real Dask cluster.

A project is a temporary folder with this repository's dvc.yaml and code (the stages depend on it), a small
params.yaml (two fine-tunes of the tiny zoo given as local folders, fixed factors, a few evaluation examples), a git
repository and `dvc init`.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from dppa.pipeline.dvc_process import stage_environment
from tests.helpers.pipeline import (
    ALL_STAGES,
    FINETUNES,
    assert_reran,
    built_once,
    dvc,
    edit_params,
    out_hashes,
    stages_run,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built_project(tmp_path_factory, tiny_zoo, prefect_api, stage_server):
    """A copy of the session's built project (one full `dvc repro`), for this module's tests, which change it in
    turn (the tests that each take their own copy are in tests/test_pipeline_runs.py)."""
    pristine, _contents = built_once(tmp_path_factory, tiny_zoo, stage_server)
    project = tmp_path_factory.mktemp("pipeline") / "project"
    shutil.copytree(pristine, project, symlinks=True)
    return project


def test_repro_runs_every_stage_once_then_nothing(built_project):
    scores = json.loads((built_project / "data/metrics/scores.json").read_text())
    assert set(scores["models"]) == {"base", *FINETUNES, "merged"}
    assert scores["merged"] == {"method": "ties", "inputs": "amplified"}
    # each fine-tune scored alone, dense, pruned and amplified, on its own tasks
    for ft in FINETUNES:
        record = json.loads((built_project / f"data/metrics/finetunes/{ft}.json").read_text())
        assert (record["method"], record["density"], record["split"]) == ("dp", 0.2, "test")
        assert set(record["scores"]) == {"base", "dense", "pruned", "amplified"}
        assert all(set(s) == {f"zoo_{ft}"} for s in record["scores"].values())
        # the dense fine-tune's score is the evaluate stage's (one cache, one key for a model folder)
        assert record["scores"]["dense"][f"zoo_{ft}"] == scores["models"][ft][f"zoo_{ft}"]["exact_match"]
    # the merge scale was searched over the grid on the validation split, and the chosen one was merged
    trace = list(csv.DictReader((built_project / "data/plots/merge_scale.csv").open()))
    assert [float(r["scale"]) for r in trace] == [0.5, 1.0]
    chosen = json.loads((built_project / "data/metrics/merge.json").read_text())
    best = max(trace, key=lambda r: float(r["score"]))  # the first best in grid order
    assert chosen["searched"] and chosen["scale"] == float(best["scale"])
    manifest = json.loads((built_project / "data/merged/model/dppa_manifest.json").read_text())
    assert manifest["scale"] == chosen["scale"]
    report = (built_project / "data/report/scores.md").read_text()
    assert report.count("|") > 10 and "Each fine-tune alone" in report and "searched on the validation split" in report
    assert (built_project / "data/report/scores.png").stat().st_size > 1000
    again = dvc(built_project, "repro")
    assert stages_run(again.stdout) == set()
    assert "Data and pipelines are up to date" in dvc(built_project, "status").stdout


def pipeline_flow_runs() -> int:
    """How many runs of the pipeline flow the module's Prefect API has recorded."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        return client.count_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["dppa-pipeline"])))


def test_dppa_run_with_nothing_stale_runs_nothing_and_prints_the_report(built_project, capsys):
    from dppa.cli import main

    flow_runs = pipeline_flow_runs()
    assert main(["run", "-C", str(built_project)]) == 0
    printed = capsys.readouterr().out
    assert f"0 of {len(ALL_STAGES)} stages ran" in printed
    assert "Each fine-tune alone" in printed and "Merge scale" in printed
    # DVC found nothing stale, so no flow (nor task runner, nor stage process) was started
    assert pipeline_flow_runs() == flow_runs


def test_a_code_change_makes_stale_only_the_stages_that_use_the_code(built_project):
    def stale_after_editing(module: str) -> set[str]:
        path = built_project / module
        original = path.read_text()
        path.write_text(original + "\n# an edit\n")
        try:
            return set(json.loads(dvc(built_project, "status", "--json").stdout))
        finally:
            path.write_text(original)

    # the code deps are the files each stage's command imports (scripts/code_deps.py): the factor search only in
    # amplify, the zoo's training only in zoo, the merge driver only in merge
    assert stale_after_editing("dppa/search/runner.py") == {f"amplify@{ft}" for ft in FINETUNES}
    assert stale_after_editing("dppa/zoo/training.py") == {"zoo"}
    assert stale_after_editing("dppa/merging/merge.py") == {"merge"}
    assert "Data and pipelines are up to date" in dvc(built_project, "status").stdout
    # what Python and the C compiler leave beside the code differs per machine: it is no dependency (.dvcignore)
    for built in ("dppa/io/__pycache__/reader.cpython-311.pyc", "dppa/io/_codec.cpython-311-x86_64-linux-gnu.so"):
        (built_project / built).parent.mkdir(exist_ok=True)
        (built_project / built).write_bytes(os.urandom(64))
    assert "Data and pipelines are up to date" in dvc(built_project, "status").stdout


def pipeline_task_runs() -> dict[str, set[str]]:
    """{task (its function's name): the stages it ran for} in the latest run of the pipeline flow."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        flow_filter = FlowFilter(name=FlowFilterName(any_=["dppa-pipeline"]))
        latest = client.read_flow_runs(flow_filter=flow_filter, sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[latest.id])))
    tasks: dict[str, set[str]] = {}
    for run in runs:
        tasks.setdefault(run.task_key.rsplit("-", 1)[0], set()).add(run.name)
    return tasks


def test_dppa_run_after_a_merge_scale_change_reruns_merge_evaluate_report_only(built_project, capsys):
    from dppa.cli import main

    before = out_hashes(built_project)
    edit_params(built_project, lambda p: p["merge"].update(scale=0.8, search=None))
    assert main(["run", "-C", str(built_project)]) == 0
    ran = re.search(r"stages ran \(\d+ s\): (.*)", capsys.readouterr().out).group(1)
    assert_reran("".join(f"Running stage '{stage}'\n" for stage in ran.split(", ")), {"merge", "evaluate", "report"})
    # DVC was asked again (its own process) only for the stages downstream of the stale one; the others were up
    # to date at the start and nothing they depend on ran
    downstream = {"merge", "evaluate", "report", "publish"}
    assert pipeline_task_runs() == {"repro_stage": downstream, "up_to_date": ALL_STAGES - downstream}
    after = out_hashes(built_project)
    assert after["data/merged/model"] != before["data/merged/model"]
    upstream = ("data/models/", "data/deltas/", "data/pruned/", "data/amplified/", "data/plots/search/")
    assert {k: v for k, v in after.items() if k.startswith(upstream)} == {
        k: v for k, v in before.items() if k.startswith(upstream)
    }


def test_changing_one_finetunes_density_reruns_only_its_branch(built_project, stage_server):
    edit_params(built_project, lambda p: p["models"]["finetunes"]["facts"].update(prune={"density": 0.3}))
    done = dvc(built_project, "repro", server=stage_server)
    # fetch@facts reruns (its entry changed) but writes the same record, so extract@facts stays up to date.
    assert_reran(
        done.stdout, {"fetch@facts", "prune@facts", "amplify@facts", "score@facts", "merge", "evaluate", "report"}
    )
    manifest = json.loads((built_project / "data/pruned/facts/dppa_manifest.json").read_text())
    assert manifest["density"] == 0.3
    assert stages_run(dvc(built_project, "repro").stdout) == set()


def test_killed_stage_leaves_nothing_taken_as_done(built_project, tmp_path, stage_server):
    project = built_project
    edit_params(project, lambda p: p["merge"].update(scale=0.7, search=None))
    log = tmp_path / "repro.log"
    with log.open("w") as sink:
        repro = subprocess.Popen(
            [sys.executable, "-m", "dvc", "repro"],
            cwd=project,
            env=stage_environment(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    merged = project / "data/merged/model"
    writing = []
    deadline = time.monotonic() + 600
    while repro.poll() is None and time.monotonic() < deadline and not writing:
        # The merge writes into a temporary sibling folder, renamed into place when complete: kill it there.
        writing = list(merged.parent.glob(".model.tmp-*")) if merged.parent.is_dir() else []
        time.sleep(0.002)
    os.killpg(repro.pid, signal.SIGKILL)
    repro.wait()
    assert writing, f"the merge was not caught writing:\n{log.read_text()[-3000:]}"
    assert any(path.exists() for path in writing), "the temporary folder should still be there"
    # The killed merge never reached the final path: there is nothing there (DVC removes a stage's outputs before
    # running it), or at most the previous, complete merge.
    assert not merged.exists() or (merged / "dppa_manifest.json").exists()
    assert "merge" in dvc(project, "status").stdout

    rerun = dvc(project, "repro", server=stage_server)  # (the killed run's stages started cold, in its group)
    assert_reran(rerun.stdout, {"merge", "evaluate", "report"})  # finished stages are not redone
    assert (merged / "dppa_manifest.json").exists()
    assert not list(merged.parent.glob(".model.tmp-*")), "the killed run's temporary folder survived the rerun"
    assert "Data and pipelines are up to date" in dvc(project, "status").stdout
