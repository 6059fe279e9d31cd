"""The models store: where the pipeline keeps hub models, outside DVC, one folder per commit.

Downloads run the real huggingface_hub client in fresh processes pointed at the local hub server
(tests/helpers/hub_server.py), with DPPA_MODELS_DIR set to a folder of the test; checks of a store already filled run in
this process (they need no network: HF_HUB_OFFLINE=1 here).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from dppa.pipeline.hub import ensure_model_folder, write_record
from dppa.pipeline.models_store import MODELS_DIR_ENV, StoreMismatch
from tests.helpers.hub import folder_files, hub_env, sha256
from tests.helpers.hub_server import FakeHub

pytestmark = pytest.mark.slow  # a hub server, CLI processes and model folders per test

FILES = {
    "config.json": b'{"model_type": "llama"}',
    "tokenizer.json": b'{"version": "1.0"}',
    "model.safetensors": bytes(range(256)) * 64,  # 16 KB: the store does not parse weights
}


def hand_record(repo_id: str, revision: str, commit: str, files: dict[str, bytes]) -> dict:
    """The fetch record as the pipeline must write it, built here from the files themselves."""
    listed = [{"name": n, "sha256": sha256(files[n]), "size": len(files[n])} for n in sorted(files)]
    return {"commit": commit, "files": listed, "kind": "hub", "revision": revision, "source": repo_id}


def run_python(code: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300, cwd=Path.cwd()
    )


WRITE_RECORD = "import sys; from pathlib import Path; from dppa.pipeline.hub import write_hub_record as w; "
WRITE_RECORD += "w(sys.argv[1], sys.argv[2], Path(sys.argv[3]))"
ENSURE = (
    "import logging, sys; logging.basicConfig(level=logging.DEBUG if sys.argv[2] == 'log-locks' else logging.INFO); "
    "from dppa.pipeline.hub import ensure_model_folder; print(ensure_model_folder(sys.argv[1]))"
)


def store_env(hub_url: str, tmp_path: Path, store: Path) -> dict:
    return {**hub_env(hub_url, tmp_path / "hf-home"), MODELS_DIR_ENV: str(store)}


def test_the_fetch_record_is_the_same_bytes_on_two_machines_and_a_stored_commit_is_not_downloaded_again(tmp_path):
    with FakeHub() as hub:
        commit = hub.commit("org/model", {**FILES, "README.md": b"# a model card"})
        for machine in ("a", "b"):  # two stores, two HF homes, two output folders: two teammates
            done = run_python(
                WRITE_RECORD,
                store_env(hub.url, tmp_path / machine, tmp_path / machine / "store"),
                "org/model",
                "main",
                str(tmp_path / machine / "fetched"),
            )
            assert done.returncode == 0, done.stderr
        expected = json.dumps(hand_record("org/model", "main", commit, FILES), indent=2, sort_keys=True) + "\n"
        for machine in ("a", "b"):
            assert [p.name for p in (tmp_path / machine / "fetched").iterdir()] == ["dppa_fetch.json"]
            assert (tmp_path / machine / "fetched/dppa_fetch.json").read_text() == expected
            stored = tmp_path / machine / f"store/org--model/{commit}"
            assert {k: v for k, v in folder_files(stored).items() if k != "dppa_manifest.json"} == FILES
            manifest = json.loads((stored / "dppa_manifest.json").read_text())
            assert (manifest["hub_id"], manifest["resolved_commit"]) == ("org/model", commit)

        # the commit pinned and already in the store: no question to the hub, no download
        hub.seen.clear()
        again = run_python(
            WRITE_RECORD,
            store_env(hub.url, tmp_path / "a", tmp_path / "a/store"),
            "org/model",
            commit,
            str(tmp_path / "a/pinned"),
        )
        assert again.returncode == 0, again.stderr
        assert hub.seen == []
        assert json.loads((tmp_path / "a/pinned/dppa_fetch.json").read_text())["commit"] == commit


def test_two_processes_that_need_one_missing_model_download_it_once(tmp_path):
    """A teammate has the record only (from `dvc pull`): the first process downloads the recorded commit while the
    second waits on the commit's lock, then finds it stored."""
    store = tmp_path / "store"
    record_dir = tmp_path / "fetched/ft"
    record_dir.mkdir(parents=True)
    with FakeHub() as hub:
        commit = hub.commit("org/ft", FILES)
        hub.commit("org/ft", {**FILES, "config.json": b"{}"})  # main moved on: the record's commit is not main
        write_record(record_dir, hand_record("org/ft", "main", commit, FILES))
        release = hub.hold["model.safetensors"] = threading.Event()
        env = store_env(hub.url, tmp_path, store)
        logs = {name: tmp_path / f"{name}.log" for name in ("first", "second")}

        def ensure(name: str, mode: str) -> subprocess.Popen:
            command = [sys.executable, "-c", ENSURE, str(record_dir), mode]
            return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=logs[name].open("w"), text=True)

        first = ensure("first", "quiet")
        second = None
        try:
            deadline = time.monotonic() + 120
            while not hub.holding.is_set():  # the first is mid-download of the weights
                assert time.monotonic() < deadline and first.poll() is None, "the download did not get under way"
                time.sleep(0.05)
            second = ensure("second", "log-locks")
            lock_name = f".{commit}.lock"
            # filelock logs each time it finds the lock taken: the second process is waiting for the first
            while not any("not acquired" in line and lock_name in line for line in logs["second"].open()):
                assert time.monotonic() < deadline and second.poll() is None, logs["second"].read_text()
                time.sleep(0.05)
        finally:
            release.set()  # the held connection drops: the first process resumes the file
        outputs = [p.communicate(timeout=120)[0] for p in (first, second)]
        assert [p.returncode for p in (first, second)] == [0, 0], logs["second"].read_text()[-2000:]
        folder = store / f"org--ft/{commit}"
        assert [o.strip().splitlines()[-1] for o in outputs] == [str(folder)] * 2
        # the files were fetched at the recorded commit (not at main), by the first process only: huggingface_hub's
        # HTTP client logs every request it makes
        resolved = hub.requests(contains="/resolve/")
        assert resolved and all(f"/resolve/{commit}/" in r.path for r in resolved)
        small = ("config.json", "tokenizer.json")
        assert [len(hub.requests("GET", f"/resolve/{commit}/{name}")) for name in small] == [1, 1]
        assert "HTTP Request: GET" in logs["first"].read_text()
        assert "HTTP Request" not in logs["second"].read_text()
    assert {k: v for k, v in folder_files(folder).items() if k != "dppa_manifest.json"} == FILES


@pytest.fixture
def filled_store(tmp_path, monkeypatch):
    """A store holding org/ft at one commit (downloaded from the local hub), with its record; the store's env set
    in this process too."""
    store = tmp_path / "store"
    with FakeHub() as hub:
        commit = hub.commit("org/ft", FILES)
        done = run_python(WRITE_RECORD, store_env(hub.url, tmp_path, store), "org/ft", "main", str(tmp_path / "ft"))
        assert done.returncode == 0, done.stderr
    monkeypatch.setenv(MODELS_DIR_ENV, str(store))
    return tmp_path / "ft", store / f"org--ft/{commit}", commit


def test_a_stored_model_is_used_without_the_hub(filled_store):
    record_dir, folder, _ = filled_store
    assert ensure_model_folder(record_dir) == folder  # the hub has stopped; HF_HUB_OFFLINE=1 in this process


def test_a_corrupted_store_file_is_refused_in_one_line_and_left_as_it_is(filled_store):
    record_dir, folder, commit = filled_store
    weights = folder / "model.safetensors"
    corrupted = bytes(255 - b for b in weights.read_bytes())  # same size: only its content tells
    weights.write_bytes(corrupted)
    with pytest.raises(StoreMismatch) as refused:
        ensure_model_folder(record_dir)
    assert str(refused.value) == (
        f"{weights}: its sha256 is not the one {record_dir / 'dppa_fetch.json'} records for org/ft@{commit} (the "
        f"file was modified or corrupted); delete {folder} and run again to download the commit anew"
    )
    assert weights.read_bytes() == corrupted


def test_a_record_that_does_not_describe_the_stored_commit_is_refused(filled_store):
    record_dir, folder, commit = filled_store
    record = json.loads((record_dir / "dppa_fetch.json").read_text())
    record["files"][0]["sha256"] = sha256(b"something else")  # config.json, as another commit would have it
    write_record(record_dir, record)
    with pytest.raises(StoreMismatch, match=r"config\.json: its sha256 is not the one .*dppa_fetch.json records"):
        ensure_model_folder(record_dir)
    record["files"].append({"name": "extra.safetensors", "size": 4, "sha256": sha256(b"xxxx")})
    record["files"][0]["sha256"] = sha256(FILES["config.json"])
    write_record(record_dir, record)
    with pytest.raises(StoreMismatch, match=r"extra\.safetensors: missing from the models store"):
        ensure_model_folder(record_dir)


def test_help_names_the_models_store():
    for command in ("run", "fetch"):
        done = subprocess.run(
            [sys.executable, "-m", "dppa", command, "--help"], capture_output=True, text=True, check=True
        )
        assert "$DPPA_MODELS_DIR, else ~/.cache/dppa/models" in done.stdout, command


# -- a store shared by a team: members are other users of one machine (or of a shared filesystem) ------------------
TEAM_GID, MEMBER_A, MEMBER_B = 54321, 54322, 54323  # ids no account uses: setpriv needs no user database entry
STORED = (
    "import os, sys; os.umask(0o022); from dppa.pipeline.models_store import stored_model; "
    "print(stored_model(sys.argv[1], sys.argv[2]))"
)


def as_member(uid: int, code: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    """`python -c code` run as user `uid` in the team's group (umask 022, as most accounts have)."""
    command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", f"--groups={TEAM_GID}", sys.executable, "-c", code]
    return subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=300, cwd=Path.cwd())


@pytest.fixture
def team_folder():
    """A folder every test user can enter (pytest's own tmp folder is private to root), removed afterwards."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("running processes as other users needs root and setpriv (util-linux)")
    folder = Path(tempfile.mkdtemp(prefix="dppa-team-"))
    folder.chmod(0o755)
    probe = as_member(MEMBER_A, "import dppa.pipeline.hub, filelock, huggingface_hub", dict(os.environ))
    if probe.returncode != 0:
        shutil.rmtree(folder)
        pytest.skip(f"this checkout or its Python is not readable by another user: {probe.stderr.strip()[-200:]}")
    yield folder
    shutil.rmtree(folder)


def member_env(hub_url: str, folder: Path, uid: int, store: Path) -> dict:
    home = folder / f"home-{uid}"
    home.mkdir()
    os.chown(home, uid, uid)
    return {**store_env(hub_url, home, store), "HOME": str(home)}


def make_store(folder: Path, mode: int, owner: int = -1) -> Path:
    store = folder / f"store-{mode:o}"
    store.mkdir()
    os.chown(store, owner, TEAM_GID)
    store.chmod(mode)
    return store


def test_a_group_writable_store_is_shared_by_the_members_of_the_group(team_folder):
    """Member A's download of a commit is killed half-way; B (another user of the group) completes it, A uses it
    without downloading, B downloads a second commit into A's repository folder; A then cleans the store, B's files
    included. The control: in a store that is not group-writable, B cannot even take the lock of A's commit."""
    with FakeHub() as hub:
        first = hub.commit("org/model", FILES)
        second = hub.commit("org/model", {**FILES, "config.json": b'{"model_type": "llama", "v": 2}'})
        store = make_store(team_folder, 0o2775)  # the team's group owns it, setgid: what is made inside keeps it
        env_a = member_env(hub.url, team_folder, MEMBER_A, store)
        env_b = member_env(hub.url, team_folder, MEMBER_B, store)

        # A's download is killed half-way through the weights: B completes it, in the staging folder A left
        release = hub.hold["model.safetensors"] = threading.Event()
        command = ["setpriv", f"--reuid={MEMBER_A}", f"--regid={MEMBER_A}", f"--groups={TEAM_GID}"]
        killed = subprocess.Popen([*command, sys.executable, "-c", STORED, "org/model", first], env=env_a)
        assert hub.holding.wait(timeout=120)
        killed.kill()
        killed.wait(timeout=60)
        release.set()
        assert list((store / "org--model").glob(f".{first}.download-*"))  # what A left
        done = as_member(MEMBER_B, STORED, env_b, "org/model", first)
        assert done.returncode == 0, done.stderr
        hub.seen.clear()
        done = as_member(MEMBER_A, STORED, env_a, "org/model", first)
        assert done.returncode == 0, done.stderr
        assert Path(done.stdout.strip()) == store / "org--model" / first
        assert hub.requests(contains="/resolve/") == []  # A uses B's download
        done = as_member(MEMBER_B, STORED, env_b, "org/model", second)
        assert done.returncode == 0, done.stderr
        owners = {p.stat().st_uid for p in (store / "org--model").rglob("*")}
        assert owners == {MEMBER_A, MEMBER_B}
        assert {p.stat().st_gid for p in store.rglob("*")} == {TEAM_GID}

        clean = ["store", "clean", "--all", "--store", str(store)]
        done = as_member(MEMBER_A, "import sys; from dppa.cli import main; sys.exit(main(sys.argv[1:]))", env_a, *clean)
        assert done.returncode == 0, done.stderr + done.stdout
        assert list(store.iterdir()) == []  # both commits, their locks and hash caches, the repository folder

        private = make_store(team_folder, 0o755, owner=MEMBER_A)  # in the team's group, but not group-writable
        env_a[MODELS_DIR_ENV] = env_b[MODELS_DIR_ENV] = str(private)
        assert as_member(MEMBER_A, STORED, env_a, "org/model", first).returncode == 0
        refused = as_member(MEMBER_B, STORED, env_b, "org/model", first)
        assert refused.returncode != 0 and "permission denied in the models store" in refused.stderr
