"""Hub models in the pipeline: real DVC, real Prefect, the real huggingface_hub client against the local hub server
(tests/helpers/hub_server.py). A scheduled pipeline whose params name hub branches follows them; the models
themselves stay out of DVC, in the models store (DPPA_MODELS_DIR, a folder of the test), and come back from the hub
at their recorded commit when a stage needs one that is missing.

The project holds this repository's fetch and extract stages (dvc.yaml's own, cut down to them) and a params.yaml
whose base and fine-tune are private hub repositories at `revision: main`. Each run is what `dppa serve` runs on
its schedule (`dppa.flows.pipeline.scheduled_pipeline`), in a fresh process pointed at the local hub.
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

from dppa.pipeline.dvc_process import dvc_command, stage_environment
from dppa.pipeline.models_store import MODELS_DIR_ENV
from tests.helpers.hub import TOKEN, folder_files, hub_env, sha256
from tests.helpers.hub_server import FakeHub
from tests.helpers.pipeline import CODE, ROOT
from tests.helpers.synthetic import make_base, make_finetune

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


def run_env(hub: FakeHub, home: Path, store: Path) -> dict[str, str]:
    """The hub's variables, the models store, and this interpreter's bin folder on PATH (for `dvc repro` called
    here directly: `make test` does not put the virtualenv on PATH)."""
    env = {**hub_env(hub.url, home, TOKEN), MODELS_DIR_ENV: str(store)}
    env["PATH"] = stage_environment()["PATH"]
    return env


def scheduled_run(project: Path, hub: FakeHub, home: Path, store: Path) -> tuple[dict[str, str], str]:
    """One run of what `dppa serve` schedules; returns ({stage: outcome}, everything it printed)."""
    script = (
        "import json, sys; from dppa.flows.pipeline import scheduled_pipeline; "
        "print(json.dumps(scheduled_pipeline(sys.argv[1])))"
    )
    env = run_env(hub, home, store)
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
    home, store = tmp_path / "hf-home", tmp_path / "models-store"
    fetched = project / "data/models/fetched"
    with FakeHub(token=TOKEN) as hub:
        base_sha = hub.commit("org/base", folder_files(base), private=True)
        first = hub.commit("org/ft", folder_files(ft_v1), private=True)

        outcome, log1 = scheduled_run(project, hub, home, store)
        assert outcome == {stage: "ran" for stage in ("zoo", "fetch_base", "fetch@ft", "extract@ft")}
        assert json.loads((fetched / "ft/dppa_fetch.json").read_text())["commit"] == first
        assert json.loads((fetched / "base/dppa_fetch.json").read_text())["commit"] == base_sha

        # the branch has not moved: one question to the hub per model, nothing downloaded, nothing rerun
        hub.seen.clear()
        outcome, log2 = scheduled_run(project, hub, home, store)
        assert set(outcome.values()) == {"up to date"}
        assert sorted(r.path for r in hub.requests(contains="/api/models/")) == [
            "/api/models/org/base/revision/main",
            "/api/models/org/ft/revision/main",
        ]
        assert not hub.requests(contains="/resolve/") and not hub.requests(contains="/cdn/")

        # a new commit upstream moves main: the fine-tune is fetched again, its delta recomputed; the base stays
        moved = hub.commit("org/ft", folder_files(ft_v2), private=True)
        outcome, log3 = scheduled_run(project, hub, home, store)
        assert {s for s, o in outcome.items() if o == "ran"} == {"fetch@ft", "extract@ft"}
        assert f"moved upstream from commit {first} to {moved}" in log3

    record = json.loads((fetched / "ft/dppa_fetch.json").read_text())
    assert (record["revision"], record["commit"]) == ("main", moved)
    assert folder_files(store / f"org--ft/{moved}")["model.safetensors"] == folder_files(ft_v2)["model.safetensors"]
    delta = json.loads((project / "data/deltas/ft/dppa_manifest.json").read_text())
    assert delta["finetuned"]["resolved_commit"] == moved and delta["base"]["resolved_commit"] == base_sha
    # the token went to the hub only: not into the project (params, dvc.lock, records, manifests), the models store,
    # the logs, or the Prefect server's database
    for output in (log1, log2, log3):
        assert TOKEN not in output
    for folder in (project, store, Path(os.environ["PREFECT_HOME"])):
        for path in folder.rglob("*"):
            assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path


def dvc(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*dvc_command(), *args], cwd=project, env=env, capture_output=True, text=True, timeout=900)


def test_hub_models_stay_out_of_dvc_and_come_back_from_the_hub_at_the_recorded_commit(tmp_path, prefect_api):
    """The fetch stage's DVC output is the record alone; the model is in the models store once, never in the DVC
    cache; a machine without the store (a teammate after `dvc pull`) runs nothing when nothing is stale, and a stage
    that needs the model downloads the recorded commit again and computes the same delta."""
    base = make_base(tmp_path / "local/base")
    finetune = make_finetune(base, tmp_path / "local/ft", seed=1)
    hub_files = {"org/base": folder_files(base), "org/ft": folder_files(finetune)}
    weights = {sha256(data) for files in hub_files.values() for n, data in files.items() if n.endswith(".safetensors")}
    project = make_project(tmp_path / "project")
    home, store = tmp_path / "hf-home", tmp_path / "models-store"
    fetched = project / "data/models/fetched"
    with FakeHub(token=TOKEN) as hub:
        commits = {repo: hub.commit(repo, files, private=True) for repo, files in hub_files.items()}
        env = run_env(hub, home, store)
        outcome, _ = scheduled_run(project, hub, home, store)
        assert set(outcome.values()) == {"ran"}

        # the fetch stage's output is the record: the commit and the files' hashes, no path of this machine
        for name, repo in (("base", "org/base"), ("ft", "org/ft")):
            assert [p.name for p in (fetched / name).iterdir()] == ["dppa_fetch.json"]
            files = [{"name": n, "sha256": sha256(d), "size": len(d)} for n, d in sorted(hub_files[repo].items())]
            record = {"commit": commits[repo], "files": files, "kind": "hub", "revision": "main", "source": repo}
            assert (fetched / name / "dppa_fetch.json").read_text() == json.dumps(
                record, indent=2, sort_keys=True
            ) + "\n"
        # no file of the DVC cache holds a hub model's weights
        cached = [p for p in (project / ".dvc/cache").rglob("*") if p.is_file()]
        assert cached and not {sha256(p.read_bytes()) for p in cached} & weights
        # each model is in the store, once: one commit folder per model, one copy of each weight file on this
        # machine (project, cache, store and huggingface_hub's home together), each downloaded once
        assert sorted(str(p.relative_to(store)) for p in store.glob("*/*") if not p.name.startswith(".")) == [
            f"org--base/{commits['org/base']}",
            f"org--ft/{commits['org/ft']}",
        ]
        copies = [
            digest
            for folder in (project, store, home)
            for p in folder.rglob("*")
            if p.is_file() and (digest := sha256(p.read_bytes())) in weights
        ]
        assert sorted(copies) == sorted(weights)
        assert [len(hub.requests("GET", f"/cdn/{w}")) for w in sorted(weights)] == [1, 1]
        # the delta's manifest names the commits it was computed from
        delta = json.loads((project / "data/deltas/ft/dppa_manifest.json").read_text())
        assert delta["base"]["resolved_commit"] == commits["org/base"]
        assert delta["finetuned"]["resolved_commit"] == commits["org/ft"]

        # `dvc push` sends the records, not the models
        remote = tmp_path / "dvc-remote"
        assert dvc(project, env, "remote", "add", "-d", "shared", str(remote)).returncode == 0
        pushed = dvc(project, env, "push")
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr
        sent = [p for p in remote.rglob("*") if p.is_file()]
        assert sent and not {sha256(p.read_bytes()) for p in sent} & weights

        # a teammate: the project without its outputs and cache, another models store and huggingface_hub home;
        # after `dvc pull` DVC sees nothing stale, and `dppa run` runs nothing and downloads nothing (it asks where
        # main points, no more)
        teammate = tmp_path / "teammate"
        local = {project / "data", project / ".dvc/cache", project / ".dvc/tmp"}
        shutil.copytree(project, teammate, ignore=lambda d, names: [n for n in names if Path(d, n) in local])
        mate_home, mate_store = tmp_path / "teammate-hf-home", tmp_path / "teammate-models-store"
        mate_env = run_env(hub, mate_home, mate_store)
        pulled = dvc(teammate, mate_env, "pull")
        assert pulled.returncode == 0, pulled.stdout + pulled.stderr
        status = dvc(teammate, mate_env, "status", "--json")
        assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout + status.stderr
        hub.seen.clear()
        outcome, _ = scheduled_run(teammate, hub, mate_home, mate_store)
        assert set(outcome.values()) == {"up to date"}
        assert len(hub.requests(contains="/api/models/")) == 2  # where main points now, for each model
        assert not hub.requests(contains="/resolve/") and not hub.requests(contains="/cdn/")
        assert not mate_store.exists()

        # a stage that needs the models downloads them, at the recorded commits, and computes the same delta
        forced = dvc(teammate, mate_env, "repro", "--force", "--single-item", "extract@ft")
        assert forced.returncode == 0, forced.stdout[-3000:] + forced.stderr[-3000:]
        for repo, commit in commits.items():
            downloads = hub.requests("GET", f"/{repo}/resolve/")
            assert downloads and all(f"/{repo}/resolve/{commit}/" in r.path for r in downloads)
        assert [len(hub.requests("GET", f"/cdn/{w}")) for w in sorted(weights)] == [1, 1]
        again = json.loads((teammate / "data/deltas/ft/dppa_manifest.json").read_text())
        assert again["content_hash"] == delta["content_hash"]
        assert again["finetuned"]["resolved_commit"] == commits["org/ft"]
        stored = mate_store / f"org--ft/{commits['org/ft']}/model.safetensors"
        assert stored.read_bytes() == hub_files["org/ft"]["model.safetensors"]

    # the store is no DVC output: deleting it leaves nothing stale
    shutil.rmtree(store)
    status = dvc(project, env, "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout + status.stderr

    # a store file changed after its download: the stage that needs it refuses in one line, naming the file
    stored.write_bytes(bytes(255 - b for b in stored.read_bytes()))
    refused = dvc(teammate, mate_env, "repro", "--force", "--single-item", "extract@ft")
    assert refused.returncode != 0
    expected = (
        f"dppa stage: error: {stored}: its sha256 is not the one {teammate / 'data/models/fetched/ft/dppa_fetch.json'} "
        f"records for org/ft@{commits['org/ft']} (the file was modified or corrupted); delete {stored.parent} and run "
        "again to download the commit anew"
    )
    assert expected in (refused.stdout + refused.stderr).splitlines()
