"""Getting models: the demo zoo, hub snapshots (retried: networks fail), local folders; their folders."""

from __future__ import annotations

from pathlib import Path

from dppa.tasks import GPU_TAG
from prefect import task


@task(tags=[GPU_TAG])
def build_zoo(out: Path, size: str, regime: str, seed: int) -> Path:
    from dppa.io.atomic import atomic_dir
    from dppa.zoo.build import build_zoo as build

    if size == "none":
        # Nothing uses the zoo: an empty, explicit placeholder keeps the stage graph the same for every params file.
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "UNUSED").write_text("zoo.size is none in params.yaml: no demo models were built\n")
        return out
    build(out, size=size, regime=regime, seed=seed, overwrite=True)
    return out


def may_recover(task, task_run, state) -> bool:
    """Retry what a later attempt may fix (the network, a hub error 5xx, a broken download), not the hub's no
    (unknown repository or revision, refused token, pickles only) nor a models-store file that does not match its
    record: those fail at once, with their message."""
    from dppa.pipeline.hub import HubRefusal, StoreMismatch

    return not isinstance(state.data, (HubRefusal, StoreMismatch))


@task(retries=3, retry_delay_seconds=[10, 60, 180], retry_condition_fn=may_recover)
def fetch_hub(repo_id: str, revision: str, out: Path) -> Path:
    from dppa.pipeline.hub import write_hub_record

    write_hub_record(repo_id, revision, out)
    return out


@task(retries=3, retry_delay_seconds=[10, 60, 180], retry_condition_fn=may_recover)
def model_folder(fetched: Path, root: Path) -> Path:
    """The folder of a fetched model; a hub model missing from the models store is downloaded first."""
    from dppa.pipeline.hub import ensure_model_folder

    return ensure_model_folder(fetched, root)


@task(retries=3, retry_delay_seconds=[10, 60, 180], retry_condition_fn=may_recover)
def current_commit(repo_id: str, revision: str) -> str:
    """The commit a branch or tag of a hub repository points at now (one API call)."""
    from dppa.pipeline.hub import current_commit as ask

    return ask(repo_id, revision)


@task
def record_model(kind: str, source: str, folder: Path, out: Path, root: Path) -> Path:
    from dppa.pipeline.hub import record_local

    record_local(kind, source, folder, out, root)
    return out
