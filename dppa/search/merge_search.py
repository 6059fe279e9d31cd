"""`merge.scale: search` (and `merge.weights: search`): the merge's candidates, scored on the validation split,
walked by ``dppa.search.merge_grid``.

One merge at scale 1 is written per weight vector, and each candidate scale s is set in memory as
base + s * (merge_1 - base), which equals a merge at scale s because both merge methods are base + scale *
combine(deltas) (docs/method.md). The objective is the normalised score over every fine-tune's tasks, each task
against its own dense fine-tune (``dppa.evaluation.objective``). The chosen point is then merged for real by the
merge stage.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from dppa.evaluation.cache import EvalCache
from dppa.evaluation.objective import objective, task_owners
from dppa.evaluation.scores import content_hash, primary_scores, score_folder
from dppa.evaluation.scoring import BaseInMemory
from dppa.search.core import SearchResult
from dppa.search.merge_grid import merge_grid_search

TRACE_HEADER = "index,scale,score,accepted,best_score\n"  # the trace of a merge whose scale was not searched


class _MergesAtScale1:
    """Weights -> the merge at scale 1 with them, on disk under `work`; only the best point's merge and the
    current candidate's are kept (each is the size of the model)."""

    def __init__(self, base: Path, inputs: Sequence[Path], work: Path, **merge_options):
        self.base, self.inputs, self.work, self.options = base, list(inputs), work, merge_options
        self.folders: dict[tuple | None, Path] = {}
        self.made = 0

    def get(self, weights: tuple[float, ...] | None, keep: tuple[float, ...] | None) -> Path:
        from dppa.merging.merge import merge_deltas

        if weights not in self.folders:
            for old in [w for w in self.folders if w != keep]:
                shutil.rmtree(self.folders.pop(old), ignore_errors=True)
            self.made += 1
            self.folders[weights] = merge_deltas(
                self.base,
                self.inputs,
                self.work / f"merge-{self.made}",
                weights=list(weights) if weights else None,
                scale=1.0,
                overwrite=True,
                progress=False,
                **self.options,
            )
        return self.folders[weights]


def dense_task_scores(base: Path, dense: dict[str, Path], tasks: dict[str, list[str]], **evaluate) -> dict:
    """{task: the score of the dense fine-tune that owns it} (`task_owners`), through the evaluation cache."""
    owners = task_owners({n: tasks[n] for n in dense})
    own = {n: primary_scores(score_folder(folder, tasks[n], base=base, **evaluate)[0]) for n, folder in dense.items()}
    return {t: own[n][t] for t, n in owners.items()}


def search_merge(
    base: Path,
    inputs: Sequence[Path],
    dense: dict[str, Path],
    tasks: dict[str, list[str]],
    *,
    method: str,
    weights: list[float] | None,
    density: float | None,
    grid: Sequence[float],
    weight_grid: Sequence[float] | None,
    split: str,
    limit: int | None,
    batch_size: int,
    device: str,
    cache: Path,
    work: Path,
    allow_other_base: bool = False,
) -> tuple[float, list[float] | None, SearchResult, list[str]]:
    """The merge scale (and, given `weight_grid`, the per-fine-tune weights, from 1 each) that score best on
    `split`. Returns (scale, weights, the search's result, the names of its coordinates for the trace). `dense`
    and `tasks` name each fine-tune's model folder and own tasks, in the order of `inputs`; fixed `weights` (no
    weight grid) are used as they are."""
    eval_device = None if device == "auto" else device
    evaluate = {"split": split, "limit": limit, "batch_size": batch_size}
    dense_scores = dense_task_scores(base, dense, tasks, device=eval_device, cache=cache, **evaluate)
    input_hashes = [content_hash(p) for p in inputs]
    merges = _MergesAtScale1(
        base,
        inputs,
        work,
        method=method,
        options={"density": density} if method == "ties" else None,
        device=device,
        allow_other_base=allow_other_base,
    )
    evals, best = EvalCache(cache), {"score": None, "weights": None}
    fixed = tuple(weights) if weights and not weight_grid else None
    model = BaseInMemory(base, eval_device)

    def score(point: tuple[float, ...]) -> float:
        scale, w = point[0], (tuple(point[1:]) if weight_grid else fixed)
        recipe = {"method": method, "weights": list(w) if w else None, "density": density}
        scores = model.score_scaled_merge(
            merges.get(w, keep=best["weights"]),
            scale,
            input_hashes,
            recipe,
            list(dense_scores),
            cache=evals,
            **evaluate,
        )
        value, _ = objective(scores, dense_scores)
        if best["score"] is None or value > best["score"]:
            best.update(score=value, weights=w)
        return value

    try:
        start = tuple(weights) if weights else tuple(1.0 for _ in inputs)
        result = merge_grid_search(score, grid, weight_grid, start if weight_grid else ())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    scale, *searched = result.best_factors
    chosen = list(searched) if weight_grid else (list(fixed) if fixed else None)
    names = ["scale", *(f"weight_{n}" for n in dense)] if weight_grid else ["scale"]
    return scale, chosen, result, names
