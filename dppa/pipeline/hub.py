"""Fetching models: hub repositories at a pinned revision, the demo zoo, local folders; and the record of what was
fetched (`dppa_fetch.json`), which the later stages read to find each model's folder. No model is copied: hub
snapshots stay in the Hugging Face cache (or $DPPA_MODELS_DIR), zoo and local models where they are, and the record
is the fetch stage's only DVC output.

Hub downloads take safetensors weights, configs and tokenizer files only. A repository that has only pickled
weights (`*.bin`, `*.pt`) is refused unless `allow_pickle` is set, because loading a pickle runs code.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

from dppa.errors import DppaError
from dppa.io.atomic import atomic_dir

RECORD = "dppa_fetch.json"
MODELS_DIR_ENV = "DPPA_MODELS_DIR"
SAFE_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "merges.txt",
    "vocab.*",
]
PICKLE_PATTERNS = ["*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt"]


def allow_patterns(files: list[str], *, allow_pickle: bool = False, repo_id: str = "") -> list[str]:
    """The download patterns for a repository holding `files`; refuses pickle-only weights unless allowed."""
    has_safetensors = any(fnmatch.fnmatch(f, "*.safetensors") for f in files)
    if has_safetensors:
        return SAFE_PATTERNS
    if not any(fnmatch.fnmatch(f, p) for f in files for p in PICKLE_PATTERNS):
        raise DppaError(f"{repo_id}: the repository has no weight files (no *.safetensors, no *.bin)")
    if not allow_pickle:
        raise DppaError(
            f"{repo_id}: only pickled weights (*.bin / *.pt); loading them runs arbitrary code. Convert "
            "the model to safetensors, or allow pickles explicitly if you trust the repository"
        )
    return SAFE_PATTERNS + PICKLE_PATTERNS


def models_dir() -> str | None:
    """Where hub snapshots are kept: $DPPA_MODELS_DIR (a team's shared models folder), else the Hugging Face cache
    (HF_HUB_CACHE / HF_HOME, ~/.cache/huggingface/hub by default)."""
    return os.environ.get(MODELS_DIR_ENV) or None


def fetch_hub(repo_id: str, revision: str, out: Path, *, allow_pickle: bool = False) -> dict:
    """Download `repo_id` at `revision` into the models cache (`models_dir()`) and write the record at `out`.

    The weights are not copied into `out`: a hub model is reproducible from its pinned commit, so it stays out of
    DVC's cache and remote. The record (the DVC output) names the resolved commit and each file's size and hash
    (the hub's sha256 for LFS files, its git blob id otherwise), so a changed upstream file changes the record.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
        files = [s.rfilename for s in info.siblings or []]
        patterns = allow_patterns(files, allow_pickle=allow_pickle, repo_id=repo_id)
        # Download the resolved commit, not the revision name: a branch may move between the two calls.
        snapshot_download(repo_id, revision=info.sha, allow_patterns=patterns, cache_dir=models_dir())
        kept = [s for s in info.siblings or [] if any(fnmatch.fnmatch(s.rfilename, p) for p in patterns)]
        record = {
            "kind": "hub",
            "source": repo_id,
            "revision": revision,
            "commit": info.sha,
            "patterns": patterns,
            "files": [
                {"name": s.rfilename, "size": s.size, "sha256": s.lfs.sha256 if s.lfs else None, "blob_id": s.blob_id}
                for s in sorted(kept, key=lambda s: s.rfilename)
            ],
        }
        with atomic_dir(out, overwrite=True) as tmp:
            write_record(tmp, record)
    except OfflineModeIsEnabled as exc:
        raise DppaError(
            f"{repo_id}: the hub is not reachable in offline mode (HF_HUB_OFFLINE=1); unset it, or use "
            f"a local folder or zoo: source ({exc})"
        ) from None
    except HfHubHTTPError as exc:
        raise DppaError(f"{repo_id}@{revision}: hub request failed: {exc}") from None
    return record


def hub_snapshot(record: dict) -> Path:
    """The local snapshot folder of a hub record's commit, downloaded again if this machine lacks it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    args = (record["source"],)
    kwargs = {"revision": record["commit"], "allow_patterns": record.get("patterns"), "cache_dir": models_dir()}
    try:
        return Path(snapshot_download(*args, **kwargs, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    try:
        return Path(snapshot_download(*args, **kwargs))
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        where = models_dir() or "the Hugging Face cache"
        raise DppaError(
            f"{record['source']}@{record['commit']}: not in {where} and not downloadable "
            f"({exc.__class__.__name__}); set {MODELS_DIR_ENV} to the folder that holds it, or go online"
        ) from None


def local_fingerprint(folder: Path) -> list[dict]:
    """Names, sizes and modification times of a local model's files: what changed, not a content hash."""
    return [
        {"name": p.name, "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
        for p in sorted(folder.iterdir())
        if p.is_file()
    ]


def record_local(kind: str, source: str, folder: Path, out: Path, root: Path | None = None) -> dict:
    """For zoo and local models nothing is copied: the record names the folder the later stages read, relative to
    the project `root` when inside it (so that data/ stays valid when the project moves)."""
    if not (folder / "config.json").exists():
        raise DppaError(f"{folder}: not a model folder (no config.json); check the source {source!r} in params.yaml")
    path = Path(os.path.abspath(folder))
    if root is not None and path.is_relative_to(Path(os.path.abspath(root))):
        path = path.relative_to(Path(os.path.abspath(root)))
    record = {"kind": kind, "source": source, "path": str(path)}
    if kind == "local":
        record["files"] = local_fingerprint(folder)
    with atomic_dir(out, overwrite=True) as tmp:
        write_record(tmp, record)
    return record


def write_record(folder: Path, record: dict) -> None:
    (folder / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_record(fetched: str | os.PathLike) -> dict:
    path = Path(fetched) / RECORD
    if not path.exists():
        raise DppaError(f"{path}: missing; run the fetch stage first (dvc repro, or dppa stage fetch --model NAME)")
    return json.loads(path.read_text())


def model_folder(fetched: str | os.PathLike, root: str | os.PathLike = ".") -> Path:
    """The model folder a fetch record points at: a hub commit's snapshot in the models cache, or a zoo or local
    folder (relative paths are relative to the project root)."""
    record = read_record(fetched)
    if record.get("kind") == "hub":
        return hub_snapshot(record)
    path = Path(record["path"])
    return path if path.is_absolute() else Path(root) / path
