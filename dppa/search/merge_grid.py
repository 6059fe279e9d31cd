"""The merge search's walk: the merge scale over a grid, then optionally each fine-tune's weight in turn, then the
scale again for the chosen weights; recorded like the factor searches (``dppa.search.core.Recorder``, the same
``SearchResult`` and trace rows).

A point is ``(scale, w_1, ..., w_n)`` (only ``(scale,)`` when no weight is searched). One pass of coordinate ascent
over the weights: weight ``i`` takes the value of the weight grid that scores best with the others fixed, at the
best scale so far. A point is accepted only when it scores strictly better than the best so far, so ties keep the
earlier candidate and a search that finds nothing better keeps the start weights (1 for every fine-tune).

It is not one of the factor strategies (``STRATEGIES``): those walk a step grid of band factors, this one the
grids a user lists in params.yaml (``merge.search``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from dppa.search.core import Factors, Grid, Recorder, SearchResult

# Scales and weights come from params.yaml lists, not from a step: points are held at this resolution, finer than
# any value a user writes, so the recorder's exact memo applies to them too.
RESOLUTION = Grid(step=1e-9)
NAME = "merge-grid"


def merge_grid_search(
    objective: Callable[[Factors], float],
    scales: Sequence[float],
    weight_grid: Sequence[float] | None = None,
    start_weights: Sequence[float] = (),
) -> SearchResult:
    """Maximise ``objective((scale, *weights))``; with ``weight_grid``, ``start_weights`` gives one weight per
    fine-tune to start from."""
    if weight_grid and not start_weights:
        raise ValueError("a weight search needs the start weights (one per fine-tune)")
    weights = tuple(start_weights) if weight_grid else ()
    budget = 2 * len(scales) + len(weights) * len(weight_grid or ())
    recorder = Recorder(objective, RESOLUTION, max_evals=budget)
    best: dict = {"score": -math.inf, "point": None}

    def probe(point: tuple[float, ...]) -> None:
        value = recorder.score(RESOLUTION.to_units(point))
        accepted = value > best["score"]
        if accepted:
            best.update(score=value, point=point)
        recorder.mark(accepted, best["score"])

    for scale in scales:
        probe((scale, *weights))
    if weight_grid:
        for i in range(len(weights)):
            scale, *current = best["point"]
            for value in weight_grid:
                if value != current[i]:
                    probe((scale, *current[:i], value, *current[i + 1 :]))
        chosen = tuple(best["point"][1:])
        for scale in scales:
            probe((scale, *chosen))
    return recorder.result(NAME, "converged")
