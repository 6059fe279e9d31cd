"""The models store: hub models kept out of DVC, one folder per commit, `<store>/<org>--<name>/<commit sha>/`
($DPPA_MODELS_DIR, else ~/.cache/dppa/models), shared by a team when its root is group-writable (README, "Hub
models"). A commit's folder is downloaded once, under a lock, and its files are checked against a fetch record's
sha256 on every use, hashing again only files changed since they were last hashed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

from dppa.errors import DppaError
from dppa.io.atomic import atomic_write_text
from dppa.io.manifest import read_manifest

MODELS_DIR_ENV = "DPPA_MODELS_DIR"
# Beside each commit folder of the models store: the lock held while it is checked or downloaded, and the sha256 of
# its files with the size, modification time and inode each had when hashed, so that a later use hashes only files
# changed since (as DVC's own state database does).
STORE_LOCK = ".{commit}.lock"
STORE_HASHES = ".{commit}.sha256.json"


class StoreMismatch(DppaError):
    """A file of the models store is not what the fetch record says: a retry cannot help."""


def models_store() -> Path:
    """Where the pipeline keeps hub models: $DPPA_MODELS_DIR, else ($XDG_CACHE_HOME or ~/.cache)/dppa/models."""
    if os.environ.get(MODELS_DIR_ENV):
        return Path(os.environ[MODELS_DIR_ENV]).expanduser().absolute()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dppa" / "models"


def shared_store(store: Path) -> bool:
    """A store whose root is group-writable is a team's (README, "Hub models"): what dppa creates in it is made
    group-writable too, so that every member can download, check, touch and clean any commit."""
    try:
        return bool(store.stat().st_mode & stat.S_IWGRP)
    except FileNotFoundError:
        return False


def store_lock(lock_path: Path, shared: bool):
    """The file lock of one commit; readable and writable by the group in a shared store (`shared_store`), so that
    any member can take it (and touch it: its time is the commit's last use)."""
    from filelock import FileLock

    return FileLock(lock_path, mode=0o664) if shared else FileLock(lock_path)


@contextlib.contextmanager
def group_writable_files(shared: bool):
    """In a shared store, what is created while this lasts is group-writable: the umask loses its group bits. This
    covers huggingface_hub's own staging files too, so that a member can resume another member's killed download.
    The umask is the process's; a stage process does nothing else meanwhile."""
    if not shared:
        yield
        return
    umask = os.umask(0o022)
    os.umask(umask & ~0o070)
    try:
        yield
    finally:
        os.umask(umask)


def store_folder(repo_id: str, commit: str, store: Path | None = None) -> Path:
    """The folder of `repo_id` at `commit` (a full sha) in `store` (default: `models_store()`)."""
    return (store or models_store()) / repo_id.replace("/", "--") / commit


def stored_model(repo_id: str, commit: str, expected: list[dict] | None = None, *, described_in: str = "") -> Path:
    """The models store's folder of `repo_id` at `commit`, downloaded first when it is not there, and its files
    checked against `expected` (name, size, sha256: a fetch record's, `described_in`; default the folder's own
    manifest). One process at a time per commit (a file lock): two stages that need the same model wait for one
    download. A file that does not match is refused (StoreMismatch): the store is never silently repaired."""
    store = models_store()
    shared = shared_store(store)
    try:
        with group_writable_files(shared):
            return _stored_model(store, shared, repo_id, commit, expected, described_in)
    except PermissionError as exc:
        raise DppaError(
            f"{exc.filename}: permission denied in the models store {store} (another user's, or read-only); set "
            f"{MODELS_DIR_ENV} to a store of your own, or share this one with your group (chgrp GROUP {store} && "
            f"chmod 2775 {store}: README, Hub models)"
        ) from None


def _stored_model(
    store: Path, shared: bool, repo_id: str, commit: str, expected: list[dict] | None, described_in: str
) -> Path:
    folder = store_folder(repo_id, commit, store)
    folder.parent.mkdir(parents=True, exist_ok=True)
    hashes_path = folder.parent / STORE_HASHES.format(commit=commit)
    lock_path = folder.parent / STORE_LOCK.format(commit=commit)
    with store_lock(lock_path, shared):
        os.utime(lock_path)  # its time is the commit's last use, which `dppa store clean --older-than` reads
        manifest = read_manifest(folder)
        if manifest.get("resolved_commit") != commit:
            # absent, or left incomplete by hand (atomic_dir never leaves a partial folder): download it whole
            for leftover in [*folder.parent.glob(f".{commit}.tmp-*"), *folder.parent.glob(f".{commit}.old-*")]:
                shutil.rmtree(leftover, ignore_errors=True)
            from dppa.pipeline.hub import fetch_hub  # the hub module uses this one: imported when needed

            manifest = fetch_hub(repo_id, commit, folder, overwrite=True)
            # fetch_hub checked every file against the hub's hashes: what it computed need not be computed again
            atomic_write_text(hashes_path, json.dumps(hash_entries(folder, manifest["files"]), indent=2) + "\n")
        known = json.loads(hashes_path.read_text()) if hashes_path.exists() else {}
        where = described_in or f"{folder / 'dppa_manifest.json'}"
        entries = {}
        for file in expected if expected is not None else manifest["files"]:
            path = folder / file["name"]
            if not path.is_file():
                raise StoreMismatch(
                    f"{path}: missing from the models store, though {where} lists it; delete {folder} and run "
                    f"again to download {repo_id}@{commit} anew"
                )
            entries[file["name"]] = entry = known_hash(path, known.get(file["name"])) or hash_entry(path)
            if entry["sha256"] != file["sha256"]:
                raise StoreMismatch(
                    f"{path}: its sha256 is not the one {where} records for {repo_id}@{commit} (the file was "
                    f"modified or corrupted); delete {folder} and run again to download the commit anew"
                )
        if any(known.get(name) != entry for name, entry in entries.items()):
            atomic_write_text(hashes_path, json.dumps({**known, **entries}, indent=2) + "\n")
    return folder


def stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def hash_entry(path: Path) -> dict:
    """The file's sha256, with what identifies this version of the file without reading it."""
    key = stat_key(path)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return {"stat": key, "sha256": digest.hexdigest()}


def known_hash(path: Path, entry: dict | None) -> dict | None:
    """The recorded hash of `path` when the file has not changed since it was hashed (same size, mtime, inode)."""
    return entry if entry is not None and entry.get("stat") == stat_key(path) else None


def hash_entries(folder: Path, files: list[dict]) -> dict:
    return {f["name"]: {"stat": stat_key(folder / f["name"]), "sha256": f["sha256"]} for f in files}
