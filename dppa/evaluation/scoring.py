"""Scores the pipeline needs beyond whole model folders, every one through the evaluation cache:

- a delta added to the base in memory (each pruned or amplified fine-tune scored alone: what pruning cost it);
- a merge at scale 1 set in memory at another scale s, base + s * (merge_1 - base): the candidates of the
  merge-scale search (dppa.search.merge_search).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from dppa.evaluation.cache import EvalCache, eval_key
from dppa.evaluation.scores import content_hash, primary_scores

DELTA_RECIPE = {"candidate": "delta", "dtype": "float32"}


class BaseInMemory:
    """One loaded base model whose weights are set to candidates in turn (`CandidateWeights`), each scored once
    through the evaluation cache, by one `Evaluator` per task list and settings (its requests built once)."""

    def __init__(self, base: Path, device: str | None):
        from dppa.evaluation.harness import compute_dtype, load_model, to_compute_dtype
        from dppa.evaluation.weights import CandidateWeights

        self.hash = content_hash(base)
        self.compute = compute_dtype(device)
        self.model, self.tokenizer = load_model(base, device, upcast=False)
        self.weights = CandidateWeights(self.model, saved_dtypes=to_compute_dtype(self.model))
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
            model=content_hash(delta),
            base=self.hash,
            tasks=tasks,
            split=split,
            limit=limit,
            recipe=DELTA_RECIPE,
            compute=self.compute,
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
            compute=self.compute,
        )
        return self._score(key, tasks, split, limit, batch_size, cache, lambda: self.weights.towards(merged, scale))
