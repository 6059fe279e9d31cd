"""Fetching models: hub repositories at a revision, the demo zoo, local folders; and the record of what was
fetched (`dppa_fetch.json`), which the later stages read to find each model's folder.

The pipeline keeps hub models out of DVC, in the models store (`models_store()`: $DPPA_MODELS_DIR, else
~/.cache/dppa/models), one folder per commit, `<store>/<org>--<name>/<commit sha>/`: a commit never changes, so the
hub is their remote and neither the DVC cache nor the DVC remote holds a copy. The fetch stage's DVC output is only
the record (repository, revision, commit, each file's size and sha256), the same bytes on every machine; a later
stage that needs the model (`ensure_model_folder`) downloads that commit into the store if it is missing there (a
teammate who only pulled the DVC outputs, a cleaned store) and checks every file against the record's sha256.

A hub download (`fetch_hub`, used by `dppa fetch` and by the pipeline's fetch stage alike):
- asks the hub which commit the revision (branch, tag or sha) is now, with the list of its files, and downloads
  that commit, not the name: a branch that moves during the download cannot mix two commits;
- takes safetensors weights, configs and tokenizer files only; a repository that has only pickled weights
  (`*.bin`, `*.pt`) is refused unless `allow_pickle`, because loading a pickle runs code;
- downloads into a staging folder beside the output, named after the commit, which survives an interrupted run:
  the next run (or Prefect's retry) downloads only the files still missing, and huggingface_hub resumes a
  dropped connection within a file with an HTTP Range request;
- checks every file against the hub's own hashes (sha256 of LFS files, git blob sha1 of the others), then moves
  the files into the output folder in one rename: the output is complete or absent, never half-written;
- writes `dppa_manifest.json` into the model folder: repository, revision, resolved commit, files and hashes.
The token, if any, comes from huggingface_hub (`HF_TOKEN` or `hf auth login`) and is written nowhere.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from dppa.errors import DppaError
from dppa.io.adapter import is_adapter
from dppa.io.atomic import atomic_dir, check_output_free
from dppa.io.manifest import read_manifest, write_manifest
from dppa.io.space import check_free_space
from dppa.pipeline.models_store import stored_model

RECORD = "dppa_fetch.json"
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
STAGING = ".{name}.download-{commit}"  # beside the output
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
PICKLE_FLAG = "--allow-pickle"


class HubRefusal(DppaError):
    """The hub's answer is no (no such repository or revision, no access, only pickles): a retry cannot help."""


def allow_patterns(files: list[str], *, allow_pickle: bool = False, repo_id: str = "") -> list[str]:
    """The download patterns for a repository holding `files`; refuses pickle-only weights unless allowed."""
    has_safetensors = any(fnmatch.fnmatch(f, "*.safetensors") for f in files)
    if has_safetensors:
        return SAFE_PATTERNS
    if not any(fnmatch.fnmatch(f, p) for f in files for p in PICKLE_PATTERNS):
        raise HubRefusal(f"{repo_id}: the repository has no weight files (no *.safetensors, no *.bin)")
    if not allow_pickle:
        raise HubRefusal(
            f"{repo_id}: only pickled weights (*.bin / *.pt), and loading a pickle runs arbitrary code; convert "
            f"the model to safetensors, or pass {PICKLE_FLAG} to `dppa fetch` if you trust the repository"
        )
    return SAFE_PATTERNS + PICKLE_PATTERNS


@dataclass(frozen=True)
class HubFile:
    name: str
    size: int
    sha256: str | None  # LFS files: the hub's sha256 of the content
    blob_id: str  # the git blob sha1 (of the LFS pointer, for LFS files)


@dataclass(frozen=True)
class HubCommit:
    """What a revision of a repository is right now: its commit and files."""

    repo_id: str
    revision: str
    commit: str
    files: tuple[HubFile, ...]


def is_commit_sha(revision: str) -> bool:
    """A full commit sha names one commit forever; a branch or tag name may move."""
    return bool(COMMIT_SHA.match(revision))


def resolve(repo_id: str, revision: str) -> HubCommit:
    """The commit `revision` points at now, with its files (one API call)."""
    from huggingface_hub import HfApi

    with hub_errors(repo_id, revision):
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    files = tuple(
        HubFile(s.rfilename, s.size or 0, s.lfs.sha256 if s.lfs else None, s.blob_id or "") for s in info.siblings or []
    )
    return HubCommit(repo_id, revision, info.sha, files)


def current_commit(repo_id: str, revision: str) -> str:
    """The commit a revision points at now: a commit sha is itself (no network), a branch or tag is asked for."""
    if is_commit_sha(revision):
        return revision
    from huggingface_hub import HfApi

    with hub_errors(repo_id, revision):
        return HfApi().model_info(repo_id, revision=revision).sha


def fetch_hub(
    repo_id: str,
    revision: str,
    out: Path,
    *,
    allow_pickle: bool = False,
    overwrite: bool = False,
) -> dict:
    """Download `repo_id` at `revision` into the model folder `out` (atomically); returns its manifest."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    out = Path(out)
    check_output_free(out, overwrite)
    target = resolve(repo_id, revision)
    patterns = allow_patterns([f.name for f in target.files], allow_pickle=allow_pickle, repo_id=repo_id)
    wanted = {f.name: f for f in filter_repo_objects(target.files, allow_patterns=patterns, key=lambda f: f.name)}
    staging = out.parent / STAGING.format(name=out.name, commit=target.commit[:12])
    for stale in out.parent.glob(STAGING.format(name=out.name, commit="*")):
        if stale != staging:  # a download of a commit the revision no longer points at
            shutil.rmtree(stale, ignore_errors=True)
    staged = sum((staging / n).stat().st_size for n in wanted if (staging / n).is_file())  # a resumed download
    check_free_space(out, sum(f.size for f in wanted.values()) - staged)  # before the first byte is downloaded
    with hub_errors(repo_id, revision):
        snapshot_download(repo_id, revision=target.commit, local_dir=staging, allow_patterns=patterns)
    files = [verified(staging, wanted[name], repo_id, revision) for name in sorted(wanted)]
    manifest = {
        "kind": "model",
        "source": "hub",
        "hub_id": repo_id,
        "revision": revision,
        "resolved_commit": target.commit,
        "allow_pickle": allow_pickle,
        "files": files,
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for name in wanted:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, tmp / name)
        write_manifest(tmp, manifest)
    shutil.rmtree(staging, ignore_errors=True)
    return manifest


def verified(folder: Path, expected: HubFile, repo_id: str, revision: str) -> dict:
    """The file's record, after checking its size and hash against what the hub said."""
    path = folder / expected.name
    if not path.is_file():
        raise DppaError(
            f"{repo_id}@{revision}: {expected.name} was not downloaded (the connection failed); run again "
            "to download the missing files"
        )
    sha256, blob = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            sha256.update(chunk)
            if expected.sha256 is None:
                blob.update(chunk)
    sha256 = sha256.hexdigest()
    ok = path.stat().st_size == expected.size and (
        sha256 == expected.sha256 if expected.sha256 else not expected.blob_id or blob.hexdigest() == expected.blob_id
    )
    if not ok:
        path.unlink()  # the next run downloads it again
        raise DppaError(
            f"{repo_id}@{revision}: {expected.name} does not match the hub's size or hash (a corrupted download); "
            "run again to download it anew"
        )
    return {"name": expected.name, "size": expected.size, "sha256": sha256}


def token_refusal(where: str, status, token_advice: str, access: str) -> str | None:
    """The line for a hub answer that refuses the token (401) or its access (403, `access`: read, write to); None
    for any other status."""
    if status == 401:
        return f"{where}: the hub refused the token (401); {token_advice}"
    if status == 403:
        return f"{where}: the token may not {access} this repository (403); {token_advice}"
    return None


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str):
    """huggingface_hub's and the network's failures as one line naming repo@revision and what to do."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}"
    token = "set HF_TOKEN to a token that may read it" if not os.environ.get("HF_TOKEN") else "check HF_TOKEN"
    try:
        yield
    except OfflineModeIsEnabled:
        raise HubRefusal(
            f"{where}: the hub is switched off (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE to download"
        ) from None
    except HFValidationError as exc:
        raise HubRefusal(f"{where}: not a hub repository id ({exc})") from None
    except GatedRepoError:
        raise HubRefusal(f"{where}: a gated repository; accept its terms on the hub, then {token}") from None
    except RevisionNotFoundError:
        raise HubRefusal(f"{where}: no such revision; give an existing branch, tag or commit sha") from None
    except RepositoryNotFoundError:
        raise HubRefusal(f"{where}: no such repository on {constants.ENDPOINT}, or it is private ({token})") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        refusal = token_refusal(where, status, token, "read")
        if refusal:
            raise HubRefusal(refusal) from None
        raise DppaError(f"{where}: the hub answered {status}; retry later") from None
    except (httpx2.HTTPError, LocalEntryNotFoundError, ConnectionError, TimeoutError) as exc:
        raise DppaError(
            f"{where}: cannot reach the hub at {constants.ENDPOINT} ({type(exc).__name__}); check the network "
            "(or HF_ENDPOINT) and run again: completed files are kept and not downloaded twice"
        ) from None


def write_hub_record(repo_id: str, revision: str, out: Path) -> dict:
    """The pipeline's fetch stage for a hub model: the commit `revision` points at now, in the models store
    (downloaded unless already there), and `out/dppa_fetch.json`, its record. The record names no path on this
    machine, so it is the same bytes wherever it is fetched."""
    commit = current_commit(repo_id, revision)
    folder = stored_model(repo_id, commit)
    record = {
        "kind": "hub",
        "source": repo_id,
        "revision": revision,
        "commit": commit,
        "files": [{k: f[k] for k in ("name", "size", "sha256")} for f in read_manifest(folder)["files"]],
    }
    with atomic_dir(out, overwrite=True) as tmp:
        write_record(tmp, record)
    return record


def project_relative(folder: Path, root: Path | None) -> str:
    """`folder` relative to the project `root` when inside it, so that data/ stays valid when the project moves."""
    path = Path(os.path.abspath(folder))
    if root is not None and path.is_relative_to(Path(os.path.abspath(root))):
        path = path.relative_to(Path(os.path.abspath(root)))
    return str(path)


def followed_revision(fetched: Path, wanted: set[tuple[str, str]]) -> dict | None:
    """The fetch record in `fetched` when it is a hub model at a branch or tag that params.yaml still asks for
    (`wanted`: its (repo id, revision) pairs), so the hub must be asked whether it moved. None when it is pinned to
    a sha, not a hub model, never fetched, or params.yaml asks for something else (then DVC finds the fetch stale
    by itself). Reads the record only: no network."""
    if not (Path(fetched) / RECORD).exists():
        return None
    record = read_record(fetched)
    if record.get("kind") != "hub" or is_commit_sha(record["revision"]):
        return None
    return record if (record["source"], record["revision"]) in wanted else None


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
    if not (folder / "config.json").exists() and not is_adapter(folder):
        raise DppaError(
            f"{folder}: not a model folder (no config.json), nor a LoRA adapter (no adapter_config.json); "
            f"check the source {source!r} in params.yaml"
        )
    record = {"kind": kind, "source": source, "path": project_relative(folder, root)}
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


def ensure_model_folder(fetched: str | os.PathLike, root: str | os.PathLike = ".") -> Path:
    """The model folder of the fetch record in `fetched`. A hub model's is its commit's folder in the models store,
    downloaded first when missing (network) and checked against the record's hashes; a zoo or local model's is the
    folder the record names (relative paths are relative to the project root)."""
    record = read_record(fetched)
    if record["kind"] == "hub":
        return stored_model(
            record["source"], record["commit"], record["files"], described_in=str(Path(fetched) / RECORD)
        )
    path = Path(record["path"])
    return path if path.is_absolute() else Path(root) / path
