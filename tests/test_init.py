"""`dppa init` makes a project for the user's own models that `dppa run` runs on the installed package."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dppa.pipeline.dvc_process import stage_environment

ROOT = Path(__file__).resolve().parents[1]


def dppa(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dppa", *map(str, args)],
        cwd=cwd,
        env=stage_environment(),  # the stages call `dppa`: this interpreter's bin folder first on PATH
        capture_output=True,
        text=True,
    )


@pytest.mark.slow
def test_init_writes_a_checked_project_with_comments_and_no_code_deps(tmp_path):
    base, ft = tmp_path / "base", tmp_path / "ft"
    for folder in (base, ft):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    done = dppa("init", tmp_path / "p", "--base", base, "--finetune", f"math={ft}", "--tasks", "math=gsm8k")
    assert done.returncode == 0, done.stderr
    project = tmp_path / "p"
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["models"] == {
        "base": {"source": str(base)},
        "finetunes": {"math": {"source": str(ft), "tasks": ["gsm8k"]}},
    }
    assert params["zoo"]["size"] == "none" and "# a registered pruning method" in (project / "params.yaml").read_text()
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    repo_stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(repo_stages)
    for name, stage in stages.items():
        body = stage.get("do", stage)
        assert body["deps"][0] == "dppa_version.txt", name
        assert not [d for d in body["deps"] if d.split("/")[0] in ("dppa", "flows", "tasks")], name
    assert (project / ".dvc").is_dir() and (project / ".git").is_dir()
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=project, capture_output=True, text=True)
    assert status.returncode == 0, status.stderr  # DVC reads the stage graph

    hub = dppa("init", tmp_path / "q", "--base", "org/base@main", "--finetune", "math=org/math")
    assert hub.returncode == 2 and "--finetune math= org/math: neither a folder nor a hub model" in hub.stderr
    bad = dppa("init", tmp_path / "r", "--base", base, "--finetune", f"m={ft}", "--set", "prune.density=1.5")
    assert bad.returncode == 2 and "prune.density" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "q").exists() and not (tmp_path / "r").exists()
    again = dppa("init", project, "--base", base, "--finetune", f"math={ft}")
    assert again.returncode == 2 and "exists" in again.stderr


@pytest.mark.slow
def test_init_on_the_zoo_keeps_the_zoo_models_at_the_size_given(tmp_path):
    done = dppa("init", tmp_path / "real", "--zoo", "smollm2-135m", "--set", "zoo.regime=light")
    assert done.returncode == 0, done.stderr
    params = yaml.safe_load((tmp_path / "real" / "params.yaml").read_text())
    repo = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["zoo"] == {**repo["zoo"], "size": "smollm2-135m", "regime": "light"}
    assert params["models"] == repo["models"]  # zoo:base and zoo:<domain> with their tasks
    mixed = dppa("init", tmp_path / "mixed", "--zoo", "tiny", "--base", "org/base@main")
    assert mixed.returncode == 2 and "--zoo makes a project on the zoo's own models" in mixed.stderr
    none = dppa("init", tmp_path / "none")
    assert none.returncode == 2 and "give --base SOURCE (or --zoo SIZE" in none.stderr
    assert not (tmp_path / "mixed").exists() and not (tmp_path / "none").exists()


@pytest.mark.slow
def test_dppa_run_in_a_new_project(tmp_path, tiny_zoo):
    settings = [
        "evaluate.limit=4",
        "evaluate.batch_size=8",
        "amplify.factors=[1.8,1.0]",
        "amplify.search=null",
        "merge.scale=0.8",
        "merge.search=null",
        "merge.weights=null",
        "runtime.device=cpu",
    ]
    args = ["init", tmp_path / "project", "--base", tiny_zoo / "base"]
    for ft in ("arith", "facts"):
        args += ["--finetune", f"{ft}={tiny_zoo / ft}", "--tasks", f"{ft}=zoo_{ft}"]
    for setting in settings:
        args += ["--set", setting]
    assert dppa(*args).returncode == 0
    project = tmp_path / "project"
    done = dppa("run", cwd=tmp_path / "project")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "16 of 16 stages ran" in done.stdout and "Publish: off" in done.stdout
    scores = json.loads((project / "data/metrics/scores.json").read_text())
    assert set(scores["models"]) == {"base", "arith", "facts", "merged"}
    assert (project / "data/merged/model/README.md").exists() and (project / "dvc.lock").exists()
    assert "0 of 16 stages ran" in dppa("run", cwd=project).stdout
