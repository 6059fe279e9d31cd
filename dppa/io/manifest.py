"""`dppa_manifest.json`: what an artifact is and where it came from, beside its tensors."""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from dppa import __version__
from dppa.errors import DppaError

MANIFEST_NAME = "dppa_manifest.json"
DELTA_KINDS = ("delta", "pruned", "amplified")  # what extract, prune and amplify write


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DppaError(f"{path}: invalid JSON ({exc}); the artifact is corrupt, recreate it") from None


def check_is_delta(folder: str | os.PathLike) -> dict:
    """The manifest of a delta folder; a model folder (no dppa manifest, or a merged model) is refused."""
    manifest = read_manifest(folder)
    kind = manifest.get("kind")
    if kind not in DELTA_KINDS:
        what = "a model folder" if kind in (None, "model") else f"a {kind!r} artifact"
        from dppa.io.adapter import is_adapter  # here: the adapter reader is not needed to read manifests

        if is_adapter(folder):
            what = "a LoRA adapter folder"
        raise DppaError(f"{folder}: is {what}, not a delta; run `dppa extract BASE MODEL` first")
    return manifest


def input_kind(folder: str | os.PathLike) -> tuple[str, dict]:
    """("delta", manifest) for a folder written by extract / prune / amplify, ("model", manifest) for a model folder
    (no dppa manifest, or a model dppa merged); other artifacts are refused. The manifest alone decides."""
    manifest = read_manifest(folder)
    kind = manifest.get("kind")
    if kind in DELTA_KINDS:
        return "delta", manifest
    if kind in (None, "model"):
        return "model", manifest
    raise DppaError(f"{folder}: is a {kind!r} artifact, neither a delta nor a model folder")


def write_manifest(folder: str | os.PathLike, manifest: dict) -> None:
    body = {"dppa_version": __version__, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    body.update(manifest)
    (Path(folder) / MANIFEST_NAME).write_text(json.dumps(body, indent=2, sort_keys=False) + "\n")


def source_record(folder: Path, content_hash: str) -> dict:
    """Provenance of an input folder: its path, where it was fetched from (if known) and its content hash."""
    record = {"path": str(Path(folder).resolve()), "content_hash": content_hash}
    upstream = read_manifest(folder)
    for key in ("kind", "hub_id", "revision", "resolved_commit", "source"):
        if key in upstream:
            record[key] = upstream[key]
    return record
