"""A pipeline project on the tiny zoo for the tests (this repository's dvc.yaml and code, a small params.yaml, git
and DVC), and helpers to run DVC in it and to watch its processes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from filelock import FileLock

from dppa.pipeline.dvc_process import stage_environment
from dppa.pipeline.stage_client import SERVER_ENV

ROOT = Path(__file__).resolve().parents[2]

FINETUNES = ("arith", "facts")

PER_FINETUNE = ("fetch", "extract", "prune", "amplify", "score")

ALL_STAGES = {
    "zoo",
    "fetch_base",
    *(f"{s}@{ft}" for s in PER_FINETUNE for ft in FINETUNES),
    "merge",
    "evaluate",
    "report",
    "publish",
}

CODE = ("dppa", "flows", "tasks")


def small_params(zoo: Path) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["models"] = {
        "base": {"source": str(zoo / "base")},
        "finetunes": {ft: {"source": str(zoo / ft), "tasks": [f"zoo_{ft}"]} for ft in FINETUNES},
    }
    params["zoo"]["size"] = "none"  # the models come from the session's tiny zoo, as local folders
    params["amplify"] = {"bands": [0.5, 1.0], "factors": [1.8, 1.0]}
    params["merge"]["search"].update(grid=[0.5, 1.0], limit=4)
    params["merge"]["weights"] = None  # the weights search has its own test (test_merge_search.py)
    params["evaluate"].update(limit=4, batch_size=8)
    params["runtime"].update(device="cpu", concurrency=2, gpu_concurrency=2)
    return params


def make_project(folder: Path, zoo: Path) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", folder / "dvc.yaml")
    shutil.copy(ROOT / ".dvcignore", folder / ".dvcignore")
    for code in CODE:
        shutil.copytree(ROOT / code, folder / code, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "params.yaml").write_text(yaml.safe_dump(small_params(zoo), sort_keys=False))
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=folder, check=True)
    return folder


def edit_params(project: Path, change) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    change(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def dvc(project: Path, *args: str, check: bool = True, server: str | None = None) -> subprocess.CompletedProcess:
    """`dvc ARGS` in `project`; `server`: a warm stage server's socket (the `stage_server` fixture) for its stages."""
    env = stage_environment()
    if server:
        env[SERVER_ENV] = server
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def assert_reran(output: str, expected: set[str]) -> None:
    """Exactly `expected` ran, except that `report` and `publish` may be skipped: DVC reruns them only when the
    scores or traces they read changed, and the tiny models' scores often do not move."""
    ran = stages_run(output)
    if "merge" in expected:  # publish (off here) follows the merged model and the report
        expected = expected | {"publish"}
    optional = {"report", "publish"}
    assert expected - optional <= ran <= expected, f"ran {sorted(ran)}, expected {sorted(expected)}"


def artifact_contents(project: Path, relocatable: bool = False) -> dict[str, str]:
    """{file under each recorded output: sha256}, with an engine manifest standing for its tensors' content hash
    (a manifest also holds its creation time, which differs between two runs of the same computation).
    `relocatable`: the project's own path, which a merge recipe records for its inputs, counts as `<project>`, so
    that two projects computed in two folders compare equal."""
    contents = {}
    for out in out_hashes(project):
        path = project / out
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.name == "dppa_manifest.json":
                contents[str(file.relative_to(project))] = json.loads(file.read_text()).get("content_hash", "")
            elif file.is_file():
                data = file.read_bytes()
                if relocatable:
                    data = data.replace(str(project).encode(), b"<project>")
                contents[str(file.relative_to(project))] = hashlib.sha256(data).hexdigest()
    return contents


def out_hashes(project: Path) -> dict[str, str]:
    """{output path: md5} of every stage output recorded in dvc.lock."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def session_folder(tmp_path_factory) -> Path:
    """The test session's temporary folder, the same for every pytest-xdist worker (each has its own below it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, zoo: Path, server: str | None = None) -> tuple[Path, dict[str, str]]:
    """(a project after one full `dvc repro`, its artifact contents), built once per test session and shared by the
    pytest-xdist workers: the first to ask builds it under a file lock, the others wait and reuse it. Nothing may
    change it: a test works on a copy (`shutil.copytree(project, ..., symlinks=True)`). `server`: as for `dvc`."""
    shared = session_folder(tmp_path_factory)
    project, done = shared / "pipeline-built" / "project", shared / "pipeline-built" / "contents.json"
    with FileLock(str(shared / "pipeline-built.lock")):
        if not done.exists():
            shutil.rmtree(project.parent, ignore_errors=True)
            make_project(project, zoo)
            ran = dvc(project, "repro", server=server)
            assert stages_run(ran.stdout) == ALL_STAGES
            done.write_text(json.dumps(artifact_contents(project, relocatable=True)))
    return project, json.loads(done.read_text())
