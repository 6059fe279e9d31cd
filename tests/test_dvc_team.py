"""Artifacts shared by a team through a DVC remote, with real git and real DVC on the tiny zoo: clone A runs the
pipeline and pushes, clone B pulls and finds nothing stale; outputs are links into the cache, not second copies,
and a rerun never changes a cached file; `dvc gc` keeps what the current commit uses."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.helpers.pipeline import (
    FINETUNES,
    ROOT,
    artifact_contents,
    built_once,
    dvc,
    edit_params,
    out_hashes,
    stages_run,
)

pytestmark = pytest.mark.slow
PER_FINETUNE_OUTS = ("data/models/fetched/{}", "data/deltas/{}", "data/pruned/{}", "data/amplified/{}")


def git(project: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=dppa test", "-c", "user.email=test@dppa.invalid", *args]
    return subprocess.run(command, cwd=project, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def team(tmp_path_factory, tiny_zoo, stage_server):
    root = tmp_path_factory.mktemp("team")
    pristine, _contents = built_once(tmp_path_factory, tiny_zoo, stage_server)  # the session's full `dvc repro`, copied
    a = root / "a"
    shutil.copytree(pristine, a, symlinks=True)
    shutil.copy(ROOT / ".dvc" / "config", a / ".dvc" / "config")  # the repository's cache and remote settings
    dvc(a, "remote", "modify", "local", "url", str(root / "remote"))
    dvc(a, "checkout", "--relink")  # the outputs become links into the cache, as that config asks
    assert "Data and pipelines are up to date" in dvc(a, "status").stdout
    git(a, "add", "-A")
    git(a, "commit", "-q", "-m", "pipeline on the tiny zoo")
    dvc(a, "push")
    git(root, "clone", "-q", str(a), "b")
    b = root / "b"
    dvc(b, "pull")
    return a, b


def test_clone_b_pulls_and_nothing_is_stale(team):
    a, b = team
    assert "Data and pipelines are up to date" in dvc(b, "status").stdout
    assert stages_run(dvc(b, "repro").stdout) == set()
    assert json.loads(dvc(b, "metrics", "show", "--json").stdout) == json.loads(
        dvc(a, "metrics", "show", "--json").stdout
    )
    assert artifact_contents(b) == artifact_contents(a)


def cache_file(project: Path, md5: str) -> Path:
    return project / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def test_outputs_are_links_into_the_cache_and_a_rerun_changes_no_cached_file(team, stage_server):
    a, _ = team
    for out, md5 in out_hashes(a).items():
        entries = json.loads(cache_file(a, md5).read_text()) if md5.endswith(".dir") else [{"relpath": "", "md5": md5}]
        for entry in entries:
            file = a / out / entry["relpath"]
            # the weights are hard links: one copy on disk (DVC leaves a small file whose content another output
            # already put in the cache, such as a delta's config.json, as a copy)
            if file.suffix == ".safetensors":
                assert os.path.samefile(file, cache_file(a, entry["md5"])), file
    before = {p: p.stat().st_ino for p in (a / ".dvc" / "cache" / "files").rglob("*") if p.is_file()}
    edit_params(a, lambda p: p["models"]["finetunes"][FINETUNES[0]].update(prune={"density": 0.3}))
    assert f"prune@{FINETUNES[0]}" in stages_run(dvc(a, "repro", server=stage_server).stdout)
    for path, inode in before.items():  # every object still holds the bytes its name is the hash of
        assert path.stat().st_ino == inode
        assert hashlib.md5(path.read_bytes()).hexdigest() == path.parent.name + path.name.removesuffix(".dir")
    git(a, "checkout", "--", ".")  # back to the commit: params.yaml, dvc.lock, metrics
    dvc(a, "checkout")
    assert "Data and pipelines are up to date" in dvc(a, "status").stdout


def test_gc_keeps_what_the_current_commit_uses(team):
    a, _ = team
    dvc(a, "gc", "--workspace", "--force")
    dvc(a, "gc", "--workspace", "--cloud", "--force")
    assert "Data and pipelines are up to date" in dvc(a, "status").stdout
    assert "in sync" in dvc(a, "status", "--cloud").stdout
    needed = set()
    for md5 in out_hashes(a).values():
        if md5.endswith(".dir"):  # the cached outputs are folders; the metrics and plots files are not cached
            needed.add(md5)
            needed.update(e["md5"] for e in json.loads(cache_file(a, md5).read_text()))
    kept = {p.parent.name + p.name for p in (a / ".dvc" / "cache" / "files" / "md5").rglob("*") if p.is_file()}
    assert kept == needed  # the rerun's objects (density 0.3) are gone, the commit's all there
    fresh = a.parent / "c"
    git(a.parent, "clone", "-q", str(a), "c")
    dvc(fresh, "pull")
    assert artifact_contents(fresh) == artifact_contents(a)
    assert stages_run(dvc(fresh, "repro").stdout) == set()


def unique_bytes(paths) -> int:
    """Bytes on disk of the files under `paths`, a file with several links counted once."""
    seen = {}
    for path in paths:
        for file in [path] if path.is_file() else path.rglob("*"):
            if file.is_file():
                st = file.stat()
                seen[st.st_dev, st.st_ino] = st.st_size
    return sum(seen.values())


def shared_shard(folder: Path) -> Path:
    """The one weights file of `folder` whose safetensors header marks it shared (dppa/io/sparse.py)."""
    found = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            if (handle.metadata() or {}).get("dppa_shared") == "1":
                found.append(file)
    assert len(found) == 1, folder
    return found[0]


def test_disk_per_finetune_counts_each_artifact_once(team, tiny_zoo, capsys):
    a, _ = team
    hashes = out_hashes(a)
    for ft in FINETUNES:
        outs = [o.format(ft) for o in PER_FINETUNE_OUTS]
        workspace = [a / o for o in outs]
        cached, listings = [], {}
        for out in outs:
            cached.append(cache_file(a, hashes[out]))
            listings[out] = {e["relpath"]: e["md5"] for e in json.loads(cache_file(a, hashes[out]).read_text())}
            cached += [cache_file(a, md5) for md5 in listings[out].values()]
        stored = unique_bytes(workspace + cached)
        small = sum(c.stat().st_size for c in cached if c.stat().st_size < 1 << 16)
        assert stored <= unique_bytes(workspace) + small  # the cache adds no second copy of any weights file
        # the tensors outside the blocks' matrices: one file, one cache object, for the delta, pruned and amplified
        deltas = outs[1:]
        shards = [shared_shard(a / out) for out in deltas]
        objects = {listings[out][shard.name] for out, shard in zip(deltas, shards)}
        assert len(objects) == 1 and all(os.path.samefile(s, cache_file(a, *objects)) for s in shards)
        model = unique_bytes([tiny_zoo / ft])
        assert stored <= 1.6 * model
        with capsys.disabled():
            parts = ", ".join(f"{o.split('/')[-2]} {unique_bytes([a / o.format(ft)])}" for o in PER_FINETUNE_OUTS)
            print(f"\n{ft}: workspace + cache {stored} B, {stored / model:.2f} x the fine-tune ({model} B): {parts}")
