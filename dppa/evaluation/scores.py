"""Test-split scores of whole model folders, cached by content: a rerun of the evaluate stage (after a new merge)
evaluates only the models that changed, not the base and the fine-tunes again."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from dppa.evaluation.cache import EvalCache, EvalContext

Scores = dict[str, dict[str, float]]
FOLDER_RECIPE = {"candidate": "model-folder", "dtype": "float32"}  # the key the search uses for dense models


def content_hash(folder: str | os.PathLike) -> str:
    """The engine's manifest hash when the folder has one, else computed from the tensors."""
    from dppa.io.manifest import read_manifest
    from dppa.search.runner import checkpoint_hash

    try:
        recorded = read_manifest(folder).get("content_hash")
    except Exception:  # no manifest: a model folder written by another tool
        recorded = None
    return recorded or checkpoint_hash(folder)


def score_folder(folder: str | os.PathLike, tasks: Sequence[str], *, split: str, limit: int | None,
                 batch_size: int, device: str | None, cache: str | os.PathLike | None) -> tuple[Scores, bool]:
    """(scores {task: {metric: value}}, whether they came from the cache)."""
    from dppa.evaluation.harness import evaluate_folder

    evals = EvalCache(cache) if cache is not None else None
    key = None
    if evals is not None:
        digest = content_hash(folder)
        context = EvalContext(deltas=(digest,), base=digest, tasks=tuple(tasks), split=split, limit=limit,
                              recipe=FOLDER_RECIPE)
        key = context.key(())
        hit = evals.get(key)
        if hit is not None:
            return hit, True
    scores = evaluate_folder(Path(folder), list(tasks), split=split, limit=limit, batch_size=batch_size, device=device)
    if evals is not None:
        evals.put(key, scores)
    return scores, False
