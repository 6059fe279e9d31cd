"""Getting models: the demo zoo, hub snapshots (retried: networks fail), zoo and local folders."""

from __future__ import annotations

from pathlib import Path

from dppa.pipeline.config import Params
from dppa.stages.common import UNUSED, clear_leftovers, retried


def zoo(params: Params, root: Path, out: Path) -> Path:
    """The demo models (zoo.size, zoo.regime, zoo.seed), from the per-user zoo cache when it holds them."""
    from dppa.io.atomic import atomic_dir
    from dppa.zoo.build import build_zoo, log_missed_targets, read_manifest
    from dppa.zoo.cache import cached_zoo

    clear_leftovers(out)
    if params.zoo.size == "none":
        # Nothing uses the zoo: an empty, explicit placeholder keeps the stage graph the same for every params file.
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / UNUSED).write_text("zoo.size is none in params.yaml: no demo models were built\n")
        return out
    settings = params.zoo

    def build(folder: Path) -> None:
        build_zoo(folder, size=settings.size, regime=settings.regime, seed=settings.seed, overwrite=True)

    if cached_zoo(out, settings.size, settings.regime, settings.seed, build):
        log_missed_targets(read_manifest(out).get("targets_missed", []))  # a build logs its own
    return out


def fetch(params: Params, root: Path, model: str, zoo: Path, out: Path) -> Path:
    """A hub snapshot, or the record of a zoo or local model folder (MODEL may be base)."""
    from dppa.pipeline.hub import record_local, write_hub_record

    entry = params.all_models()[model]
    source = entry.resolve(root)
    clear_leftovers(out)
    if source.kind == "hub":
        retried(lambda: write_hub_record(source.ref, entry.revision, out), f"fetch {source.ref}")
        return out
    folder = zoo / source.ref if source.kind == "zoo" else Path(source.ref)
    record_local(source.kind, entry.source, folder, out, root)
    return out


def model_folder(fetched: Path, root: Path) -> Path:
    """The folder of a fetched model; a hub model missing from the models store is downloaded first."""
    from dppa.pipeline.hub import ensure_model_folder

    return retried(lambda: ensure_model_folder(fetched, root), f"download {fetched.name}")


def current_commit(repo_id: str, revision: str) -> str:
    """The commit a branch or tag of a hub repository points at now (one API call)."""
    from dppa.pipeline.hub import current_commit as ask

    return retried(lambda: ask(repo_id, revision), f"ask the hub about {repo_id}@{revision}")
