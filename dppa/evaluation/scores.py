"""Scores of whole model folders, cached by content, and the metric a task is ranked by.

A rerun of the evaluate stage (after a new merge) evaluates only the models that changed, not the base and the
fine-tunes again; the search's dense fine-tune goes through the same key (``folder_key``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from dppa.evaluation.cache import EvalCache, EvalKey, eval_key

Scores = dict[str, dict[str, float]]  # {task: {metric: value}}, as dppa.evaluation.harness returns them
# Models are evaluated with their weights as saved (dppa.evaluation.harness.load_model), candidates included; what
# they compute in is the key's `compute`.
FOLDER_RECIPE = {"candidate": "model-folder", "dtype": "saved"}


def primary_metric(task_metrics: Mapping[str, float]) -> str:
    """The metric a task is scored by: exact_match when present (zoo tasks), else the first one the harness lists."""
    from dppa.errors import DppaError

    if "exact_match" in task_metrics:
        return "exact_match"
    if not task_metrics:
        raise DppaError("no metric in the task's results")
    return next(iter(task_metrics))


def primary_scores(scores: Scores) -> dict[str, float]:
    """{task: value of the task's primary metric}."""
    return {task: metrics[primary_metric(metrics)] for task, metrics in scores.items()}


def checkpoint_hash(folder: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """The content hash the engine's manifests use (sha256 over tensor names, dtypes, shapes and bytes); a LoRA
    adapter folder hashes as the model it makes of `base`."""
    from dppa.io.adapter import open_model
    from dppa.io.content_hash import ContentHasher, tensor_bytes

    hasher = ContentHasher()
    reader = open_model(folder, base)
    for name in reader.names():
        hasher.start(name, reader.dtype(name), reader.shape(name))
        for _, chunk in reader.iter_chunks(name, 1 << 24):
            hasher.update(tensor_bytes(chunk))
    return hasher.hexdigest()


def recorded_hash(folder: str | os.PathLike, record: Mapping | None, base: str | os.PathLike | None = None) -> str:
    """``folder``'s content hash: taken from a manifest's source record when it names this folder, else computed."""
    if record and record.get("content_hash") and Path(record.get("path", "")) == Path(folder).resolve():
        return record["content_hash"]
    return checkpoint_hash(folder, base)


def content_hash(folder: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """The engine's manifest hash when the folder has one, else computed from the tensors."""
    from dppa.io.manifest import read_manifest

    try:
        recorded = read_manifest(folder).get("content_hash")
    except Exception:  # no manifest: a model folder written by another tool
        recorded = None
    return recorded or checkpoint_hash(folder, base)


def folder_key(digest: str, tasks: Sequence[str], *, split: str, limit: int | None, compute: str) -> EvalKey:
    """The cache key of a whole model folder's scores, given its content hash and `compute_dtype`."""
    return eval_key(model=digest, tasks=tasks, split=split, limit=limit, recipe=FOLDER_RECIPE, compute=compute)


def score_folder(
    folder: str | os.PathLike,
    tasks: Sequence[str],
    *,
    split: str,
    limit: int | None,
    batch_size: int,
    device: str | None,
    cache: str | os.PathLike | None,
    digest: str | None = None,
    base: str | os.PathLike | None = None,
) -> tuple[Scores, bool]:
    """(scores {task: {metric: value}}, whether they came from the cache); ``digest``: the folder's content hash
    when the caller knows it; ``base``: the base model folder, for a LoRA adapter folder (scored as base + adapter)."""
    from dppa.evaluation.harness import compute_dtype, evaluate_folder

    evals = EvalCache(cache) if cache is not None else None
    key = None
    if evals is not None:
        compute = compute_dtype(device)
        key = folder_key(digest or content_hash(folder, base), tasks, split=split, limit=limit, compute=compute)
        hit = evals.get(key)
        if hit is not None:
            return hit, True
    scores = evaluate_folder(
        Path(folder), list(tasks), split=split, limit=limit, batch_size=batch_size, device=device, base=base
    )
    if evals is not None:
        evals.put(key, scores)
    return scores, False
