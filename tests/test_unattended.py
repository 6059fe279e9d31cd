"""Unattended runs on the tiny zoo, with real DVC, real Prefect and real processes: a merge-only pipeline under plain
`dvc repro` (one Prefect API for all its stages, gone when DVC ends), a failed run that says which stage failed,
records it and notifies a webhook receiver on 127.0.0.1, and `dppa serve` (one run at a time, scheduled failures
recorded and sent, a prompt stop on SIGTERM)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dppa.pipeline.dvc_process import stage_environment
from tests.helpers.pipeline import _cmdline, alive, descendants, dvc, edit_params, make_project, stages_run
from tests.helpers.webhook import SECRET, Receiver

pytestmark = pytest.mark.slow


def merge_only(params: dict) -> None:
    """No fine-tune names tasks: fixed factors (the tests' default), a fixed merge scale, no evaluation."""
    for entry in params["models"]["finetunes"].values():
        entry.pop("tasks", None)
    params["merge"].update(scale=0.5, search=None)
    params["evaluate"]["tasks"] = []


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The stages' environment with no Prefect API given and a Prefect home of the test's own."""
    env = {k: v for k, v in stage_environment().items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), **extra)
    return env


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


def broken_project(folder: Path, zoo: Path, notify: str) -> Path:
    """A merge-only project whose second fine-tune's folder holds no model: its fetch stage fails."""
    project = make_project(folder, zoo)
    broken = folder.parent / "broken-model"
    broken.mkdir()

    def change(params: dict) -> None:
        merge_only(params)
        params["models"]["finetunes"]["facts"]["source"] = str(broken)
        params["runtime"]["notify"] = notify

    edit_params(project, change)
    return project


def wait_gone(pids, timeout_s: float = 30) -> dict[int, str]:
    """Waits for the processes to end; returns those still alive (with their command lines), after killing them."""
    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {p: _cmdline(p) for p in pids if alive(p)}
    for p in left:
        os.kill(p, signal.SIGKILL)
    return left


def test_merge_only_pipeline_under_plain_dvc_repro_without_prefect(tmp_path, tiny_zoo):
    project = make_project(tmp_path / "project", tiny_zoo)
    edit_params(project, merge_only)
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"], cwd=project, env=environment(tmp_path), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ran = stages_run(done.stdout)
    # every stage: 2 fine-tunes x 5, zoo, fetch_base, merge, evaluate, report, publish (off)
    assert {"merge", "evaluate", "report", "score@arith", "score@facts"} <= ran and len(ran) == 16
    # the evaluation stages ran and said that they evaluated nothing; the merge used the fixed scale
    scores = json.loads((project / "data/metrics/scores.json").read_text())
    assert scores["skipped"] == "evaluate.tasks is empty" and scores["models"] == {}
    for ft in ("arith", "facts"):
        assert json.loads((project / f"data/metrics/finetunes/{ft}.json").read_text()) == {
            "skipped": "evaluate.tasks is empty"
        }
    assert json.loads((project / "data/merged/model/dppa_manifest.json").read_text())["scale"] == 0.5
    report = (project / "data/report/scores.md").read_text()
    assert report.startswith("Nothing was evaluated: evaluate.tasks is empty.")
    assert "Not scored alone (evaluate.tasks is empty): arith, facts" in report
    assert "Merge scale 0.5, fixed in params.yaml" in report
    assert json.loads((project / "data/metrics/summary.json").read_text()) == {"skipped": "evaluate.tasks is empty"}
    # plain `dvc repro` needs nothing of Prefect: no stage started a Prefect server (none made a database)
    assert not list((tmp_path / "prefect-home").rglob("*.db"))
    assert "Data and pipelines are up to date" in dvc(project, "status").stdout


def test_a_failed_run_names_the_stage_records_it_and_notifies(tmp_path, tiny_zoo, receiver):
    project = broken_project(tmp_path / "project", tiny_zoo, receiver.url)
    done = subprocess.run(
        [sys.executable, "-m", "dppa", "run", "-C", str(project)],
        env=environment(tmp_path),
        capture_output=True,
        text=True,
    )
    # what the person at the terminal sees: exit 1, the stage, its last log lines, where the record is
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    error = done.stderr[done.stderr.index("dppa run: error:") :]
    print(f"\nwhat `dppa run` printed last:\n{error}")
    assert error.startswith("dppa run: error: stage fetch@facts failed (dvc repro exit ")
    assert "its last log lines:" in error and "not a model folder (no config.json)" in error
    assert "Traceback" not in done.stdout + done.stderr  # the run's whole log, the failed stage's records included
    latest = project / "data/runs/latest.json"
    assert f"run record: {latest}" in done.stderr
    # the record
    record = json.loads(latest.read_text())
    assert record["status"] == "failed" and record["trigger"] == "dppa run"
    assert record["failed_stage"] == "fetch@facts"
    assert record["error"].startswith("stage fetch@facts failed (dvc repro exit ")
    assert any("not a model folder" in line for line in record["log_tail"])
    assert record["params_sha256"] == hashlib.sha256((project / "params.yaml").read_bytes()).hexdigest()
    assert record["started"] <= record["ended"]
    # the stages that do not depend on the failed one ran; those that do were not run
    assert record["stages"]["fetch@arith"] == "ran" and record["stages"]["extract@arith"] == "ran"
    assert record["stages"]["extract@facts"] == "not run" and record["stages"]["merge"] == "not run"
    history = (project / "data/runs/history.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in history] == [record]
    # the notification: one POST naming the stage, with no token in it (nor in what was printed)
    (message,) = receiver.wait(1)
    assert message["path"] == f"/hook?token={SECRET}"
    sent = json.loads(message["body"])
    assert sent["subject"] == f"dppa: dppa run failed at stage fetch@facts on {record['host']}"
    assert "fetch@facts" in sent["text"] and "not a model folder" in sent["body"]
    assert SECRET not in message["body"] and SECRET not in done.stdout + done.stderr + latest.read_text()


def test_serve_runs_one_at_a_time_reports_a_failed_scheduled_run_and_stops_on_sigterm(tmp_path, tiny_zoo, receiver):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    project = broken_project(tmp_path / "project", tiny_zoo, receiver.url)
    serve = subprocess.Popen(
        [sys.executable, "-m", "dppa", "serve", "--cron", "0 0 1 1 *", "-C", str(project)],
        env=environment(tmp_path, PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output, started = [], set()
    try:
        for line in serve.stdout:
            output.append(line)
            if "is being served" in line:
                break
        url = next((m.group(1) for line in output if (m := re.match(r"Prefect API: (\S+)", line))), None)
        assert url, "".join(output)
        threading.Thread(target=lambda: output.extend(serve.stdout), daemon=True).start()
        with temporary_settings(updates={PREFECT_API_URL: url}):
            with get_client(sync_client=True) as client:
                deployment = client.read_deployment_by_name("dppa-scheduled/dppa-scheduled")
            assert deployment.global_concurrency_limit.limit == 1
            assert deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
            run_deployment("dppa-scheduled/dppa-scheduled", timeout=0)  # a run due now, as the schedule makes one
        latest = project / "data/runs/latest.json"
        deadline = time.monotonic() + 300
        while not latest.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        record = json.loads(latest.read_text())
        assert (record["status"], record["failed_stage"]) == ("failed", "fetch@facts")
        assert record["trigger"] == "dppa serve (scheduled run)"
        (message,) = receiver.wait(1)
        assert "dppa serve (scheduled run) failed at stage fetch@facts" in json.loads(message["body"])["subject"]
        time.sleep(2)  # let the failed flow run finish reporting to the API
        started = descendants(serve.pid)
        assert any("prefect" in _cmdline(p) and "server" in _cmdline(p) for p in started)
        serve.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # It stops (a TimeoutExpired fails the test). How soon is printed, not asserted: 2.8 s at a load of 3, over
        # 10 s at a load of 6 on 2 cores (a grid beside the suite), the Prefect server's shutdown waiting for a core.
        serve.wait(timeout=60)
        print(f"\ndppa serve stopped {time.monotonic() - signalled:.1f} s after SIGTERM")
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    assert not wait_gone(started, timeout_s=10), "dppa serve left processes behind"
