"""What became of each pipeline run, for the people who did not watch it.

Every run of `dppa run` and every scheduled run of `dppa serve` leaves a record in the project's runs folder
(dvc.yaml's `vars: runs`, data/runs): `latest.json` (the last run, replaced whole) and `history.jsonl` (one line
per run, appended). A record says the status (succeeded, failed, skipped, interrupted), the stage that failed with
its error and last log lines, when the run started and ended, and the sha256 of the params.yaml it read. A failed
run can also be sent to people through a Prefect notification (runtime.notify; flows/runtime.py sends it). Values
of environment variables that look like secrets (tokens, keys, passwords), and the notification target itself,
never appear in what is written or sent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from dppa.errors import DppaError
from dppa.io.atomic import atomic_write_text
from dppa.pipeline.run_lock import RunSkipped

RUNS_VAR = "runs"  # dvc.yaml's `vars` entry naming the folder (dvc.yaml is where every path is written)
LATEST = "latest.json"
HISTORY = "history.jsonl"
TAIL_LINES = 15
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL|AUTH", re.I)


class StageFailed(DppaError):
    """A stage's command failed: which stage, its exit status and the last lines of its log."""

    exit_code = 1  # the run failed; 2 stays for input the user must fix before anything runs

    def __init__(
        self, stage: str, returncode: int, tail: list[str], also: tuple[str, ...] = (), outcome: dict | None = None
    ):
        self.stage, self.returncode, self.tail, self.also = stage, returncode, list(tail), tuple(also)
        self.outcome = dict(outcome or {})  # every stage's outcome, once the pipeline has waited for them all
        others = f" (also failed: {', '.join(also)})" if also else ""
        lines = "".join(f"\n  | {line}" for line in self.tail)
        super().__init__(f"stage {stage} failed (dvc repro exit {returncode}){others}; its last log lines:{lines}")

    def __reduce__(self):  # crosses process boundaries (Dask workers) with its fields
        return type(self), (self.stage, self.returncode, self.tail, self.also, self.outcome)

    def summary(self) -> str:
        return str(self).split(";", 1)[0]


def runs_folder(project: Path) -> Path:
    """The folder of run records, as dvc.yaml's `vars` name it."""
    import yaml

    dvc_yaml = Path(project) / "dvc.yaml"
    try:
        entries = yaml.safe_load(dvc_yaml.read_text()).get("vars") or []
    except (OSError, yaml.YAMLError, AttributeError):
        entries = []
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get(RUNS_VAR), str):
            return Path(project) / entry[RUNS_VAR]
    raise DppaError(f"{dvc_yaml}: `vars` has no `{RUNS_VAR}: FOLDER` entry (where run records are written); add one")


def params_sha256(root: Path) -> str | None:
    try:
        return hashlib.sha256((Path(root) / "params.yaml").read_bytes()).hexdigest()
    except OSError:
        return None


def secrets_in_environment() -> list[str]:
    """Values of environment variables whose names say they hold a secret."""
    return [v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 6]


def redact(text: str, extra: tuple[str, ...] = ()) -> str:
    for secret in sorted({*secrets_in_environment(), *(e for e in extra if e)}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclasses.dataclass
class RunRecord:
    project: Path
    trigger: str
    notify: Callable[[str, str], None] | None = None  # set once params.yaml is read: (subject, body) -> None
    stages: dict[str, str] = dataclasses.field(default_factory=dict)  # the outcome of each stage, when it ran
    started: dt.datetime = dataclasses.field(default_factory=_now)

    def folder(self) -> Path:
        return runs_folder(self.project)

    def as_dict(self, status: str, error: BaseException | None) -> dict:
        ended = _now()
        return {
            "status": status,
            "trigger": self.trigger,
            "project": str(self.project),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self.started.isoformat(timespec="seconds"),
            "ended": ended.isoformat(timespec="seconds"),
            "duration_s": round((ended - self.started).total_seconds(), 1),
            "params_sha256": params_sha256(self.project),
            "failed_stage": getattr(error, "stage", None),
            "error": redact(error.summary() if isinstance(error, StageFailed) else _first_line(error)) or None,
            "log_tail": [redact(line) for line in getattr(error, "tail", [])],
            "stages": self.stages or getattr(error, "outcome", {}),
            "record": str(self.folder() / LATEST),
        }

    def write(self, record: dict) -> Path:
        folder = self.folder()
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / HISTORY, "a") as history:  # one write of one line: appends from two runs do not mix
            history.write(json.dumps(record) + "\n")
        return atomic_write_text(folder / LATEST, json.dumps(record, indent=2) + "\n")


def _first_line(error: BaseException | None) -> str:
    if error is None:
        return ""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def failure_message(record: dict, error: BaseException) -> tuple[str, str]:
    """(subject, body) of the notification of a failed run."""
    where = f"stage {record['failed_stage']}" if record["failed_stage"] else "before any stage ran"
    subject = f"dppa: {record['trigger']} failed at {where} on {record['host']}"
    body = [
        f"{record['trigger']} of {record['project']} on {record['host']} failed at {where}.",
        f"error: {record['error']}",
        f"started {record['started']}, ended {record['ended']}; params.yaml sha256 {record['params_sha256']}",
    ]
    if record["log_tail"]:
        body += ["last log lines:", *(f"  {line}" for line in record["log_tail"])]
    body.append(f"run record: {record['record']}")
    return subject, "\n".join(body)


@contextlib.contextmanager
def recorded_run(
    project: str | os.PathLike,
    trigger: str,
    *,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> Iterator[RunRecord]:
    """Record the run done in the block (set `stages` on the yielded record, and `notify` to send failures)."""
    run = RunRecord(Path(project).resolve(), trigger)
    try:
        yield run
    except RunSkipped as skipped:
        run.write(run.as_dict("skipped", skipped))
        raise
    except Exception as error:
        record = run.as_dict("failed", error)
        path = run.write(record)
        log(f"run record: {path}")
        if run.notify is not None:
            subject, body = failure_message(record, error)
            try:
                run.notify(subject, body)
            except Exception as failed:  # the run's own failure is what matters; say why no one was told
                log(f"the failure notification (runtime.notify) could not be sent: {redact(_first_line(failed))}")
        raise
    except BaseException as stopped:  # Ctrl-C, SIGTERM, a cancelled scheduled run
        run.write(run.as_dict("interrupted", stopped))
        raise
    else:
        run.write(run.as_dict("succeeded", None))
