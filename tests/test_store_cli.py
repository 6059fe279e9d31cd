"""`dppa store list / clean` on a models store built by hand (real files, no hub), with projects whose fetch records
are written by hand."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dppa.cli import main
from dppa.pipeline.hub import ensure_model_folder
from dppa.pipeline.models_store import MODELS_DIR_ENV

BASE_USED, BASE_OLD, FT, STAGED = "a" * 40, "b" * 40, "c" * 40, "d" * 40
DAY = 86400


def write_files(folder: Path, files: dict[str, bytes]) -> int:
    """Write the files; their total size, counted from the bytes given."""
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return sum(len(data) for data in files.values())


def commit_files(repo_id: str, commit: str, weights: int) -> dict[str, bytes]:
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": bytes(weights)}
    listed = [{"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in sorted(files.items())]
    manifest = {"kind": "model", "source": "hub", "hub_id": repo_id, "resolved_commit": commit, "files": listed}
    return {**files, "dppa_manifest.json": json.dumps(manifest).encode()}


def record(repo_id: str, commit: str, files: dict[str, bytes]) -> dict:
    listed = [
        {"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
        for n, d in sorted(files.items())
        if n != "dppa_manifest.json"
    ]
    return {"kind": "hub", "source": repo_id, "revision": "main", "commit": commit, "files": listed}


@pytest.fixture
def store(tmp_path):
    """org/base at two commits (the project uses the first), org/ft at one commit (unused) and a leftover staging
    folder of another commit; each commit folder with its lock and hash cache. Returns (store, project, sizes)."""
    store = tmp_path / "store"
    sizes, made = {}, {}
    for repo_id, commit, weights in [("org/base", BASE_USED, 2_000_000), ("org/base", BASE_OLD, 1_500_000)] + [
        ("org/ft", FT, 700_000)
    ]:
        repo_dir = store / repo_id.replace("/", "--")
        (repo_dir / commit).mkdir(parents=True)
        made[commit] = commit_files(repo_id, commit, weights)
        sizes[commit] = write_files(repo_dir / commit, made[commit])
        (repo_dir / f".{commit}.lock").touch()
        (repo_dir / f".{commit}.sha256.json").write_text("{}\n")
    staging = store / "org--ft" / f".{STAGED}.download-{STAGED[:12]}"
    staging.mkdir()
    sizes[STAGED] = write_files(staging, {"model.safetensors": bytes(300_000), "sub/config.json": b"{}"})
    project = tmp_path / "project"
    (project / "dvc.yaml").parent.mkdir()
    (project / "dvc.yaml").write_text("stages: {}\n")
    records = {
        "base": record("org/base", BASE_USED, made[BASE_USED]),
        "arith": {"kind": "zoo", "source": "zoo:arith", "path": "data/models/zoo/arith"},
    }
    for name, rec in records.items():
        (project / "data/models/fetched" / name).mkdir(parents=True)
        (project / "data/models/fetched" / name / "dppa_fetch.json").write_text(json.dumps(rec))
    return store, project, sizes


def dppa(capsys, *argv: str) -> tuple[int, list[str], str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out.splitlines(), out.err


def paths(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def set_times(store: Path, commit: str, seconds_ago: float) -> None:
    """Every file and folder of the commit (and its lock and hash cache) last modified `seconds_ago`."""
    stamp = time.time() - seconds_ago
    for path in store.rglob("*"):
        if commit in str(path.relative_to(store)):
            os.utime(path, (stamp, stamp))


def mb(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


def test_list_shows_each_commit_with_its_size_and_whether_the_project_uses_it(store, capsys):
    store, project, sizes = store
    rc, lines, _ = dppa(capsys, "store", "list", "--store", str(store), "-C", str(project))
    assert rc == 0
    rows = {tuple(line.split()) for line in lines[2:5]}
    stamp = time.strftime("%Y-%m-%d", time.localtime())
    assert {(r[0], r[1], f"{r[2]} {r[3]}", r[4], r[6]) for r in rows} == {
        ("org/base", BASE_USED[:12], mb(sizes[BASE_USED]), stamp, "yes"),
        ("org/base", BASE_OLD[:12], mb(sizes[BASE_OLD]), stamp, "no"),
        ("org/ft", FT[:12], mb(sizes[FT]), stamp, "no"),
    }
    assert lines[0] == f"models store {store}: 3 commit folder(s)"
    staged = f"org--ft/.{STAGED}.download-{STAGED[:12]}"
    assert lines[6].split()[:3] == [staged, *mb(sizes[STAGED]).split()]
    assert lines[-1] == f"total {mb(sum(sizes.values()))}"


def test_clean_removes_exactly_what_no_project_uses_and_dry_run_removes_nothing(store, capsys):
    store, project, sizes = store
    before = paths(store)
    rc, dry, _ = dppa(capsys, "store", "clean", "--store", str(store), "-C", str(project), "--dry-run")
    assert rc == 0 and paths(store) == before
    rc, done, _ = dppa(capsys, "store", "clean", "--store", str(store), "-C", str(project))
    assert rc == 0
    gone = {
        f"org/base@{BASE_OLD[:12]}: {mb(sizes[BASE_OLD])}",
        f"org/ft@{FT[:12]}: {mb(sizes[FT])}",
        f"org/ft@{STAGED[:12]} (leftover download): {mb(sizes[STAGED])}",
    }
    assert {line.removeprefix("would remove ") for line in dry[:-1]} == gone
    assert {line.removeprefix("removed ") for line in done[:-1]} == gone
    freed = mb(sizes[BASE_OLD] + sizes[FT] + sizes[STAGED])
    assert dry[-1] == f"would free {freed}; kept 1 commit(s)"
    assert done[-1] == f"freed {freed}; kept 1 commit(s)"
    kept = {p for p in before if p.startswith(f"org--base/{BASE_USED}") or BASE_USED in p} | {"org--base"}
    assert paths(store) == kept
    assert {f"org--base/.{BASE_USED}.lock", f"org--base/.{BASE_USED}.sha256.json"} <= kept


def test_older_than_keeps_what_was_used_recently(store, capsys):
    store, project, sizes = store
    set_times(store, BASE_OLD, 10 * DAY)
    set_times(store, FT, 3 * DAY)
    rc, lines, _ = dppa(capsys, "store", "clean", "--store", str(store), "-C", str(project), "--older-than", "5")
    assert rc == 0
    assert lines == [
        f"removed org/base@{BASE_OLD[:12]}: {mb(sizes[BASE_OLD])}",
        f"freed {mb(sizes[BASE_OLD])}; kept 2 commit(s)",
    ]
    assert not (store / "org--base" / BASE_OLD).exists() and not (store / "org--base" / f".{BASE_OLD}.lock").exists()
    assert (store / "org--ft" / FT / "model.safetensors").stat().st_size == 700_000


def test_a_stage_using_a_commit_makes_it_recent(store, capsys, monkeypatch):
    store, project, sizes = store
    monkeypatch.setenv(MODELS_DIR_ENV, str(store))
    fetched = project / "data/models/fetched/base"
    set_times(store, BASE_USED, 10 * DAY)
    set_times(store, BASE_OLD, 10 * DAY)
    assert ensure_model_folder(fetched) == store / "org--base" / BASE_USED  # writes the hash cache
    for path in (store / "org--base").glob(f".{BASE_USED}.*"):  # lock and hash cache; the files keep their times
        os.utime(path, (time.time() - 10 * DAY,) * 2)
    ensure_model_folder(fetched)  # a later stage: the hash cache is up to date and not rewritten
    rc, lines, _ = dppa(capsys, "store", "clean", "--all", "--older-than", "5", "--dry-run")
    assert rc == 0
    assert lines[0] == f"would remove org/base@{BASE_OLD[:12]}: {mb(sizes[BASE_OLD])}"
    assert lines[-1] == f"would free {mb(sizes[BASE_OLD])}; kept 2 commit(s)"


HOLD = (
    "import sys; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True)"
)
HOLD += "; sys.stdin.read()"


def test_a_commit_whose_lock_is_held_is_skipped_not_removed(store, capsys):
    store, project, sizes = store
    lock = store / "org--base" / f".{BASE_OLD}.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        rc, lines, _ = dppa(capsys, "store", "clean", "--store", str(store), "-C", str(project))
    finally:
        holder.communicate("", timeout=30)
    assert rc == 0
    assert f"org/base@{BASE_OLD[:12]}: in use, skipped (a running stage holds {lock})" in lines
    assert lines[-1] == f"freed {mb(sizes[FT] + sizes[STAGED])}; kept 1 commit(s), 1 in use"
    assert (store / "org--base" / BASE_OLD / "model.safetensors").stat().st_size == 1_500_000
    assert not (store / "org--ft").exists()
    rc, lines, _ = dppa(capsys, "store", "clean", "--store", str(store), "-C", str(project))
    assert lines == [
        f"removed org/base@{BASE_OLD[:12]}: {mb(sizes[BASE_OLD])}",
        f"freed {mb(sizes[BASE_OLD])}; kept 1 commit(s)",
    ]


def test_clean_without_projects_is_refused_in_one_line_and_removes_nothing(store, capsys):
    store, _, _ = store
    before = paths(store)
    rc, lines, err = dppa(capsys, "store", "clean", "--store", str(store))
    assert rc == 2 and lines == []
    assert err == (
        "dppa store: error: which commits are in use is unknown: pass with -C every project that uses the store "
        "(dppa store clean -C PROJECT ...), or --all to remove everything\n"
    )
    assert paths(store) == before
