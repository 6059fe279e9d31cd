"""A scheduled pipeline whose params name hub branches follows them: real DVC, real Prefect, the real
huggingface_hub client against the local hub server (tests/hub_server.py).

The project holds this repository's fetch and extract stages (dvc.yaml's own, cut down to them) and a params.yaml
whose base and fine-tune are private hub repositories at `revision: main`. Each run is what `dppa serve` runs on
its schedule (`flows.pipeline.scheduled_pipeline`), in a fresh process pointed at the local hub.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dppa.pipeline.dvc_process import stage_environment
from tests.hub_server import FakeHub
from tests.synthetic import make_base, make_finetune
from tests.test_hub_fetch import TOKEN, folder_files, hub_env
from tests.test_pipeline import CODE, ROOT

pytestmark = pytest.mark.slow
STAGES = ("zoo", "fetch_base", "fetch", "extract")


def make_project(folder: Path) -> Path:
    folder.mkdir(parents=True)
    graph = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    graph["stages"] = {name: graph["stages"][name] for name in STAGES}
    (folder / "dvc.yaml").write_text(yaml.safe_dump(graph, sort_keys=False))
    shutil.copy(ROOT / ".dvcignore", folder / ".dvcignore")
    for code in CODE:
        shutil.copytree(ROOT / code, folder / code, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["models"] = {
        "base": {"source": "org/base", "revision": "main"},
        "finetunes": {"ft": {"source": "org/ft", "revision": "main", "tasks": ["zoo_arith"]}},
    }
    params["zoo"]["size"] = "none"
    params["runtime"].update(device="cpu")
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=folder, check=True)
    return folder


def scheduled_run(project: Path, hub: FakeHub, home: Path) -> tuple[dict[str, str], str]:
    """One run of what `dppa serve` schedules; returns ({stage: outcome}, everything it printed)."""
    script = (
        "import json, sys; from flows.pipeline import scheduled_pipeline; "
        "print(json.dumps(scheduled_pipeline(sys.argv[1])))"
    )
    env = {**stage_environment(), **hub_env(hub.url, home, TOKEN)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(project)], cwd=project, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout + done.stderr


def test_a_scheduled_run_follows_a_moved_branch_and_reruns_nothing_when_it_stayed(tmp_path, prefect_api):
    base = make_base(tmp_path / "local/base")
    ft_v1 = make_finetune(base, tmp_path / "local/ft1", seed=1)
    ft_v2 = make_finetune(base, tmp_path / "local/ft2", seed=2)
    project = make_project(tmp_path / "project")
    home = tmp_path / "hf-home"
    fetched = project / "data/models/fetched"
    with FakeHub(token=TOKEN) as hub:
        base_sha = hub.commit("org/base", folder_files(base), private=True)
        first = hub.commit("org/ft", folder_files(ft_v1), private=True)

        outcome, log1 = scheduled_run(project, hub, home)
        assert outcome == {stage: "ran" for stage in ("zoo", "fetch_base", "fetch@ft", "extract@ft")}
        assert json.loads((fetched / "ft/dppa_fetch.json").read_text())["commit"] == first
        assert json.loads((fetched / "base/dppa_fetch.json").read_text())["commit"] == base_sha

        # the branch has not moved: one question to the hub per model, nothing downloaded, nothing rerun
        hub.seen.clear()
        outcome, log2 = scheduled_run(project, hub, home)
        assert set(outcome.values()) == {"up to date"}
        assert sorted(r.path for r in hub.requests(contains="/api/models/")) == [
            "/api/models/org/base/revision/main",
            "/api/models/org/ft/revision/main",
        ]
        assert not hub.requests(contains="/resolve/") and not hub.requests(contains="/cdn/")

        # a new commit upstream moves main: the fine-tune is fetched again, its delta recomputed; the base stays
        moved = hub.commit("org/ft", folder_files(ft_v2), private=True)
        outcome, log3 = scheduled_run(project, hub, home)
        assert {s for s, o in outcome.items() if o == "ran"} == {"fetch@ft", "extract@ft"}
        assert f"moved upstream from commit {first} to {moved}" in log3

    record = json.loads((fetched / "ft/dppa_fetch.json").read_text())
    assert (record["revision"], record["commit"]) == ("main", moved)
    assert folder_files(project / record["path"])["model.safetensors"] == folder_files(ft_v2)["model.safetensors"]
    delta = json.loads((project / "data/deltas/ft/dppa_manifest.json").read_text())
    assert delta["finetuned"]["resolved_commit"] == moved and delta["base"]["resolved_commit"] == base_sha
    # the token went to the hub only: not into the project (params, dvc.lock, records, manifests), the logs, or
    # the Prefect server's database
    for output in (log1, log2, log3):
        assert TOKEN not in output
    for folder in (project, Path(os.environ["PREFECT_HOME"])):
        for path in folder.rglob("*"):
            assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path
