"""Run records and failure notifications, without a pipeline: what is written, what is sent, what is never said."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from dppa.errors import DppaError
from dppa.pipeline.run_lock import RunSkipped
from dppa.pipeline.run_record import StageFailed, recorded_run, redact, runs_folder
from tests.helpers.webhook import SECRET, Receiver

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path) -> Path:
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text("runtime: {device: cpu}\n")
    return tmp_path


def test_the_runs_folder_comes_from_dvc_yaml(project):
    assert runs_folder(project) == project / "data" / "runs"
    (project / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(DppaError, match=r"dvc.yaml: `vars` has no `runs: FOLDER` entry"):
        runs_folder(project)


def test_a_failed_stage_is_recorded_and_sent(project):
    sent, logged = [], []
    failure = StageFailed("prune@math", 1, ["Running stage 'prune@math':", "dppa stage: error: out of memory"])
    with pytest.raises(StageFailed):
        with recorded_run(project, "dppa run", log=logged.append) as run:
            run.notify = lambda subject, body: sent.append((subject, body))
            raise failure
    record = json.loads((project / "data/runs/latest.json").read_text())
    assert record["status"] == "failed" and record["failed_stage"] == "prune@math"
    assert record["error"] == "stage prune@math failed (dvc repro exit 1)"
    assert record["log_tail"] == failure.tail
    assert record["params_sha256"] == hashlib.sha256(b"runtime: {device: cpu}\n").hexdigest()
    assert logged == [f"run record: {project / 'data/runs/latest.json'}"]
    ((subject, body),) = sent
    assert subject.startswith("dppa: dppa run failed at stage prune@math on ")
    assert "dppa stage: error: out of memory" in body and record["started"] in body


def test_every_run_is_one_line_of_the_history(project):
    with recorded_run(project, "dppa run") as run:
        run.stages = {"zoo": "ran"}
    with pytest.raises(RunSkipped):
        with recorded_run(project, "dppa serve (scheduled run)"):
            raise RunSkipped("dppa run (pid 1 on h, started t) is running on this project; this run was skipped")
    with pytest.raises(DppaError):
        with recorded_run(project, "dppa serve (scheduled run)"):
            raise DppaError("params.yaml: prune.density: must be in (0, 1], got 1.5")
    history = [json.loads(line) for line in (project / "data/runs/history.jsonl").read_text().splitlines()]
    assert [(r["status"], r["failed_stage"]) for r in history] == [
        ("succeeded", None),
        ("skipped", None),
        ("failed", None),
    ]
    assert history[0]["stages"] == {"zoo": "ran"} and history[0]["error"] is None
    assert history[2]["error"] == "params.yaml: prune.density: must be in (0, 1], got 1.5"
    assert json.loads((project / "data/runs/latest.json").read_text()) == history[2]


def test_secrets_in_the_environment_are_never_written_or_sent(project, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdef123456")
    monkeypatch.setenv("DPPA_MODEL_NAME", "plainvalue123")
    assert redact("login hf_abcdef123456 as plainvalue123") == "login *** as plainvalue123"
    sent = []
    with pytest.raises(StageFailed):
        with recorded_run(project, "dppa run") as run:
            run.notify = lambda subject, body: sent.append(body)
            raise StageFailed("fetch@math", 1, ["401 Unauthorized for token hf_abcdef123456"])
    written = (project / "data/runs/latest.json").read_text()
    assert "hf_abcdef123456" not in written + sent[0] and "token ***" in written


def test_a_notification_that_cannot_be_sent_is_logged_without_its_address(project):
    from dppa.flows.runtime import notifier

    logged = []
    unreachable = f"http://127.0.0.1:9/hook?token={SECRET}"  # the discard port: nothing listens there
    with pytest.raises(StageFailed):
        with recorded_run(project, "dppa run", log=logged.append) as run:
            run.notify = notifier(unreachable)
            raise StageFailed("merge", 1, [])
    assert logged[-1].startswith("the failure notification (runtime.notify) could not be sent: the receiver could")
    assert SECRET not in "".join(logged)


def test_a_webhook_url_is_sent_through_prefects_custom_webhook_block():
    from dppa.flows.runtime import notifier

    receiver = Receiver()
    try:
        notifier(receiver.url)("subject line", "body\nwith lines")
        (message,) = receiver.wait(1)
    finally:
        receiver.close()
    assert json.loads(message["body"]) == {
        "text": "subject line\n\nbody\nwith lines",
        "subject": "subject line",
        "body": "body\nwith lines",
    }
    assert notifier(None) is None
