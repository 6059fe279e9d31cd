"""The one normalised score: how good a candidate is relative to the dense fine-tune(s) it stands for.

Every consumer goes through here: the amplification-factor search, the merge-scale search, the score stage, the
report (and so the publish gate) and the grid tables (docs/method.md, "The objective").

- A task's ratio is candidate score / the dense fine-tune's score on it (1.0 = as good as the fine-tune).
- The normalised score of a candidate is the geometric mean of its tasks' ratios: a candidate that loses one task
  entirely scores 0, which an arithmetic mean would hide behind the others.
- The zero rule: a task the dense fine-tune scores 0 on carries no information (nothing to keep) and is left out.
  When every task is left out, there is no normalised score (None); a search then ranks candidates by the
  geometric mean of their raw scores (`objective`), which orders them the same way a normalisation would and is
  flagged as raw in what it records.
- Gain retention, for a base that does not score 0 (a real LLM): the share of the fine-tune's gain over the base
  that the candidate keeps, (score - base) / (dense - base), capped at 1; undefined (None) when the fine-tune is no
  better than the base.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping


def geometric_mean(values: Iterable[float]) -> float:
    """The geometric mean of non-negative values; 0 as soon as one is 0 (a candidate that fails a task fails)."""
    values = list(values)
    if not values:
        raise ValueError("the geometric mean of no values")
    if any(v <= 0 for v in values):
        return 0.0
    return math.exp(sum(math.log(v) for v in values) / len(values))


def ratio(score: float, dense: float) -> float | None:
    """score / the dense fine-tune's score; None when the fine-tune scores 0 (the zero rule)."""
    return score / dense if dense > 0 else None


def gain_kept(score: float, dense: float, base: float) -> float | None:
    """The share of the fine-tune's gain over the base that `score` keeps, capped at 1; None when there is no gain."""
    return min(1.0, (score - base) / (dense - base)) if dense > base else None


def task_owners(tasks: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """{task: the fine-tune whose dense score it is measured against}, from {fine-tune: its tasks}; a task two
    fine-tunes list is owned by the first."""
    owners: dict[str, str] = {}
    for finetune, own in tasks.items():
        for task in own:
            owners.setdefault(task, finetune)
    return owners


def task_ratios(scores: Mapping[str, float], dense: Mapping[str, float]) -> dict[str, float]:
    """{task: ratio} over the tasks of `scores` that have an informative dense score (the zero rule)."""
    missing = [t for t in scores if t not in dense]
    if missing:
        raise ValueError(f"no dense fine-tune score for task(s) {', '.join(missing)}")
    ratios = {t: ratio(scores[t], dense[t]) for t in scores}
    return {t: r for t, r in ratios.items() if r is not None}


def normalised_score(scores: Mapping[str, float], dense: Mapping[str, float]) -> float | None:
    """The geometric mean over tasks of score / the dense fine-tune's score; None when no task is informative."""
    ratios = task_ratios(scores, dense)
    return geometric_mean(ratios.values()) if ratios else None


def objective(scores: Mapping[str, float], dense: Mapping[str, float]) -> tuple[float, bool]:
    """(value, normalised): what a search maximises. The normalised score when one exists, else the geometric mean
    of the raw scores, with normalised False."""
    value = normalised_score(scores, dense)
    if value is not None:
        return value, True
    return geometric_mean(scores.values()), False


def mean_gain_kept(scores: Mapping[str, float], dense: Mapping[str, float], base: Mapping[str, float]) -> float | None:
    """The mean over tasks of `gain_kept` (gains can be negative, so no geometric mean); None when no task has one."""
    kept = [gain_kept(scores[t], dense[t], base[t]) for t in scores]
    known = [k for k in kept if k is not None]
    return sum(known) / len(known) if known else None
