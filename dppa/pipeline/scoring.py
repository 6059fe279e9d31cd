"""Scores the pipeline needs beyond whole model folders, every one through the evaluation cache:

- a delta added to the base in memory (each pruned or amplified fine-tune scored alone: what pruning cost it);
- merges at several scales (the merge-scale search): one merge at scale 1 is written, and each candidate scale s
  is set in memory as base + s * (merge_1 - base), which equals a merge at scale s because both merge methods are
  base + scale * combine(deltas) (docs/method.md). The chosen scale is then merged for real.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from dppa.evaluation.cache import EvalCache, eval_key
from dppa.evaluation.objective import objective, task_owners
from dppa.evaluation.scores import content_hash, primary_scores

DELTA_RECIPE = {"candidate": "delta", "dtype": "float32"}


class BaseInMemory:
    """One loaded base model whose weights are set to candidates in turn (`CandidateWeights`), each scored once
    through the evaluation cache, by one `Evaluator` per task list and settings (its requests built once)."""

    def __init__(self, base: Path, device: str | None):
        from dppa.evaluation.harness import load_model
        from dppa.evaluation.weights import CandidateWeights

        self.hash = content_hash(base)
        self.model, self.tokenizer = load_model(base, device)
        self.weights = CandidateWeights(self.model)
        self._evaluators: dict[tuple, object] = {}

    def _evaluator(self, tasks: Sequence[str], split: str, limit: int | None, batch_size: int):
        from dppa.evaluation.harness import Evaluator

        key = (tuple(tasks), split, limit, batch_size)
        if key not in self._evaluators:
            self._evaluators[key] = Evaluator(
                self.model, self.tokenizer, list(tasks), split=split, limit=limit, batch_size=batch_size
            )
        return self._evaluators[key]

    def _score(
        self,
        key,
        tasks: Sequence[str],
        split: str,
        limit: int | None,
        batch_size: int,
        cache: EvalCache,
        set_weights: Callable[[], None],
    ) -> dict[str, float]:
        scores = cache.get(key)
        if scores is None:
            evaluator = self._evaluator(tasks, split, limit, batch_size)
            try:
                set_weights()
                scores = evaluator.scores()
            finally:
                self.weights.restore()
            cache.put(key, scores)
        return primary_scores(scores)

    def score_delta(
        self, delta: Path, tasks: Sequence[str], *, split: str, limit: int | None, batch_size: int, cache: EvalCache
    ) -> dict[str, float]:
        """{task: score} of base + the delta folder."""
        key = eval_key(
            model=content_hash(delta), base=self.hash, tasks=tasks, split=split, limit=limit, recipe=DELTA_RECIPE
        )
        return self._score(key, tasks, split, limit, batch_size, cache, lambda: self.weights.add_delta(delta))

    def score_scaled_merge(
        self,
        merged: Path,
        scale: float,
        inputs: Sequence[str],
        recipe: dict,
        tasks: Sequence[str],
        *,
        split: str,
        limit: int | None,
        batch_size: int,
        cache: EvalCache,
    ) -> dict[str, float]:
        """{task: score} of base + scale * (merged - base); `inputs` (the merged deltas' hashes) and `recipe`
        (method, weights, trim) identify the merge in the cache key, the scale is its factor."""
        key = eval_key(
            model=inputs,
            base=self.hash,
            factors=(scale,),
            tasks=tasks,
            split=split,
            limit=limit,
            recipe={"candidate": "merge", **recipe, "dtype": "float32"},
        )
        return self._score(key, tasks, split, limit, batch_size, cache, lambda: self.weights.towards(merged, scale))


def trace_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["index", "scale", "score", "best_score"])
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


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
) -> tuple[float, list[float] | None, list[dict]]:
    """The merge scale (and, given `weight_grid`, the per-fine-tune weights) that score best on `split`: the
    normalised score over every fine-tune's tasks, each task's against its own dense fine-tune
    (dppa.evaluation.objective). Returns (scale, weights, trace rows).

    The scales of `grid` are tried first; with a weight grid, each fine-tune's weight in turn takes the value of
    the grid that scores best with the others fixed (coordinate ascent, one pass), then the scales are tried again
    for the chosen weights. Ties keep the earlier candidate, so a search that finds nothing better keeps weights 1.
    `dense` and `tasks` name each fine-tune's model folder and own tasks, in the order of `inputs`."""
    from dppa.evaluation.scores import score_folder
    from dppa.merging.merge import merge_deltas

    evals = EvalCache(cache)
    eval_device = None if device == "auto" else device
    references = {
        n: primary_scores(
            score_folder(
                folder,
                tasks[n],
                split=split,
                limit=limit,
                batch_size=batch_size,
                device=eval_device,
                cache=cache,
                base=base,
            )[0]
        )
        for n, folder in dense.items()
    }
    owners = task_owners({n: tasks[n] for n in dense})
    all_tasks = list(owners)
    dense_scores = {t: references[n][t] for t, n in owners.items()}
    input_hashes = [content_hash(p) for p in inputs]
    # weights -> the merge at scale 1 with them (candidate scales are set in memory); only the best one's and the
    # current candidate's are kept on disk: each is the size of the model
    merges: dict[tuple, Path] = {}
    made = 0

    def merged_at_1(w: tuple[float, ...] | None) -> Path:
        nonlocal made
        if w not in merges:
            for old in [k for k in merges if k != best.get("weights")]:
                shutil.rmtree(merges.pop(old), ignore_errors=True)
            made += 1
            merges[w] = merge_deltas(
                base,
                list(inputs),
                work / f"merge-{made}",
                method=method,
                weights=list(w) if w else None,
                scale=1.0,
                options={"density": density} if method == "ties" else None,
                device=device,
                overwrite=True,
                progress=False,
                allow_other_base=allow_other_base,
            )
        return merges[w]

    rows: list[dict] = []
    best = {"score": -math.inf}
    tried: set[tuple] = set()

    def score(scale: float, w: tuple[float, ...] | None) -> None:
        if (scale, w) in tried:
            return
        tried.add((scale, w))
        recipe = {"method": method, "weights": list(w) if w else None, "density": density}
        scores = model.score_scaled_merge(
            merged_at_1(w),
            scale,
            input_hashes,
            recipe,
            all_tasks,
            split=split,
            limit=limit,
            batch_size=batch_size,
            cache=evals,
        )
        value, _ = objective(scores, dense_scores)
        if value > best["score"]:
            best.update(score=value, scale=scale, weights=w)
        row = {"index": len(rows), "scale": scale, "score": round(value, 6), "best_score": round(best["score"], 6)}
        if weight_grid:
            row["weights"] = " ".join(f"{n}={x:g}" for n, x in zip(dense, w))
        rows.append(row)

    try:
        model = BaseInMemory(base, eval_device)
        start = tuple(weights) if weights else (tuple(1.0 for _ in inputs) if weight_grid else None)
        for scale in grid:
            score(scale, start)
        if weight_grid:
            for i in range(len(inputs)):
                current = best["weights"]
                for value in weight_grid:
                    if value != current[i]:
                        score(best["scale"], current[:i] + (value,) + current[i + 1 :])
            chosen = best["weights"]
            for scale in grid:
                score(scale, chosen)
        return best["scale"], list(best["weights"]) if best["weights"] else None, rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def finetune_table(finetunes: Path) -> list[dict]:
    """One row per fine-tune from the score stage's records (FOLDER/NAME.json): each variant's mean score over
    the fine-tune's tasks, and its normalised score (over the dense fine-tune's)."""
    import json

    rows = []
    for path in sorted(Path(finetunes).glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("skipped"):
            continue
        row = {"fine-tune": path.stem, "pruning": f"{record['method']} {record['density']:g}"}
        for variant, scores in record["scores"].items():
            row[variant] = sum(scores.values()) / len(scores)
        for variant, value in record["normalised"].items():
            row[f"{variant} / dense"] = value
        rows.append(row)
    return rows


def pipeline_notes(finetunes: Path, merge_json: Path) -> str:
    """Markdown for the report: what pruning cost each fine-tune, and the merge scale used."""
    import json

    import pandas as pd

    rows = finetune_table(finetunes)
    text = ""
    if rows:
        table = pd.DataFrame(rows).set_index("fine-tune")
        text += "\nEach fine-tune alone (same split), pruned and amplified, against its dense self\n\n"
        text += table.to_markdown(floatfmt=".3f") + "\n"
    not_scored: dict[str, list[str]] = {}  # why -> fine-tunes
    for path in sorted(Path(finetunes).glob("*.json")):
        why = json.loads(path.read_text()).get("skipped")
        if why:
            not_scored.setdefault(why, []).append(path.stem)
    for why, names in not_scored.items():
        text += f"\nNot scored alone ({why}): {', '.join(names)}\n"
    merge = json.loads(Path(merge_json).read_text()) if Path(merge_json).exists() else None
    if merge:
        how = (
            f"searched on the validation split (objective {merge['best_score']:.3f})"
            if merge["searched"]
            else "fixed in params.yaml"
        )
        weights = merge.get("weights")
        chosen = f" with weights {', '.join(f'{n} {w:g}' for n, w in weights.items())}" if weights else ""
        text += f"\nMerge scale {merge['scale']:g}{chosen}, {how}\n"
    return text
