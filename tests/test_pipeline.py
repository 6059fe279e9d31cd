"""The orchestrated pipeline on the tiny zoo, with real DVC, real Prefect (embedded API) and a real Dask cluster.

A project is a temporary folder with this repository's dvc.yaml and code (the stages depend on it), a small
params.yaml (two fine-tunes of the tiny zoo given as local folders, fixed factors, a few evaluation examples), a git
repository and `dvc init`.
"""

from __future__ import annotations

import csv
import json
import os
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
    _cmdline,
    alive,
    artifact_contents,
    assert_reran,
    descendants,
    dvc,
    edit_params,
    make_project,
    out_hashes,
    stages_run,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built_project(tmp_path_factory, tiny_zoo, prefect_api):
    """A project after one full `dvc repro` (shared by the tests that only read or rerun it)."""
    project = make_project(tmp_path_factory.mktemp("pipeline") / "project", tiny_zoo)
    done = dvc(project, "repro")
    assert stages_run(done.stdout) == ALL_STAGES
    BUILT_CONTENTS[project] = artifact_contents(project)  # before any test changes it
    return project


BUILT_CONTENTS: dict = {}  # built_project's artifacts as plain `dvc repro` made them


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


def test_changing_merge_scale_reruns_merge_evaluate_report_only(built_project):
    before = out_hashes(built_project)
    edit_params(built_project, lambda p: p["merge"].update(scale=0.8, search=None))
    done = dvc(built_project, "repro")
    assert_reran(done.stdout, {"merge", "evaluate", "report"})
    after = out_hashes(built_project)
    assert after["data/merged/model"] != before["data/merged/model"]
    upstream = ("data/models/", "data/deltas/", "data/pruned/", "data/amplified/", "data/plots/search/")
    assert {k: v for k, v in after.items() if k.startswith(upstream)} == {
        k: v for k, v in before.items() if k.startswith(upstream)
    }


def test_changing_one_finetunes_density_reruns_only_its_branch(built_project):
    edit_params(built_project, lambda p: p["models"]["finetunes"]["facts"].update(prune={"density": 0.3}))
    done = dvc(built_project, "repro")
    # fetch@facts reruns (its entry changed) but writes the same record, so extract@facts stays up to date.
    assert_reran(
        done.stdout, {"fetch@facts", "prune@facts", "amplify@facts", "score@facts", "merge", "evaluate", "report"}
    )
    manifest = json.loads((built_project / "data/pruned/facts/dppa_manifest.json").read_text())
    assert manifest["density"] == 0.3
    assert stages_run(dvc(built_project, "repro").stdout) == set()


def test_killed_stage_leaves_nothing_taken_as_done(built_project, tmp_path):
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

    rerun = dvc(project, "repro")
    assert_reran(rerun.stdout, {"merge", "evaluate", "report"})  # finished stages are not redone
    assert (merged / "dppa_manifest.json").exists()
    assert not list(merged.parent.glob(".model.tmp-*")), "the killed run's temporary folder survived the rerun"
    assert "Data and pipelines are up to date" in dvc(project, "status").stdout


def test_experiment_grid_runs_each_point_as_a_dvc_experiment(built_project, tmp_path):
    from dppa.pipeline.grid import points, recorded, run_grid

    project = tmp_path / "grid"
    shutil.copytree(built_project, project, symlinks=True)
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
    assert "## pruning (2 of 2 points)" in text
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
    dvc(project, "exp", "remove", "--all-commits")
    assert not set(recorded(project)) & {p["name"] for p in expected}
    log.clear()
    results = run_grid(spec, ["pruning"], project, tmp_path / "results", log=log.append)
    assert log == [f"{p['name']}: recorded, skipped" for p in expected]
    assert results.read_text() == text


def test_dask_local_cluster_gives_the_same_artifacts_as_plain_dvc_repro(built_project, tmp_path, capsys):
    """The whole pipeline on a Dask LocalCluster of two processes, from nothing, writes the same bytes as the
    shared project's plain `dvc repro` (one full run fewer than running the threads path again)."""
    from dppa.cli.run import run_pipeline

    project = tmp_path / "project"
    shutil.copytree(built_project, project, symlinks=True)
    edit_params(project, lambda p: p["runtime"].update(task_runner="local-cluster:2"))
    # Start from nothing, DVC's run cache (.dvc/cache/runs) included, so that every stage really runs.
    for produced in ("dvc.lock", "data", ".dvc/cache"):
        target = project / produced
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    started = time.perf_counter()
    outcome = run_pipeline(project)
    wall = time.perf_counter() - started
    assert set(outcome) == ALL_STAGES and set(outcome.values()) == {"ran"}
    with capsys.disabled():
        print(f"\npipeline wall time, 2 fine-tunes, Dask LocalCluster(2 processes): {wall:.1f} s")
    assert artifact_contents(project) == BUILT_CONTENTS[built_project]
    assert "Data and pipelines are up to date" in dvc(project, "status").stdout


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_run_killed_mid_stage_leaves_no_process_and_the_next_run_completes(built_project, tmp_path, sig):
    project = tmp_path / "project"
    shutil.copytree(built_project, project, symlinks=True)
    # a scale no other test used, so that DVC's run cache cannot restore the merge instead of running it
    edit_params(
        project,
        lambda p: p["merge"].update(scale={signal.SIGKILL: 0.91, signal.SIGTERM: 0.92, signal.SIGINT: 0.93}[sig]),
    )
    env = {k: v for k, v in stage_environment().items() if k != "PREFECT_API_URL"}  # its own temporary server
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    run = subprocess.Popen(
        [sys.executable, "-m", "dppa", "run", "-C", str(project)],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    for line in run.stdout:  # until the merge stage's own process runs
        if "Running stage 'merge'" in line:
            break
    deadline = time.monotonic() + 60
    while not any("stage" in _cmdline(p) and "merge" in _cmdline(p) for p in descendants(run.pid)):
        assert time.monotonic() < deadline and run.poll() is None, "the merge stage never started"
        time.sleep(0.05)
    started = descendants(run.pid)
    assert any("uvicorn" in _cmdline(p) for p in started)  # the temporary Prefect server is among them
    run.send_signal(sig)
    run.wait(timeout=60)
    run.stdout.close()
    deadline = time.monotonic() + 30
    while any(alive(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {p: _cmdline(p) for p in started if alive(p)}
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"left behind after {sig.name}: {left}"
    again = subprocess.run(
        [sys.executable, "-m", "dppa", "run", "-C", str(project)], env=env, text=True, capture_output=True
    )
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "merge" in again.stdout
