"""Pattern (compass) search over the band factors: moves both ways, with shrinking steps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from dppa.search.core import BudgetSpent, Factors, Grid, Objective, Recorder, SearchResult, Units, check_budget
from dppa.search.registry import STRATEGIES


@dataclass(frozen=True)
class PatternOptions:
    budget: int = field(default=20, metadata={"help": "most candidate evaluations"})
    step: float = field(default=0.1, metadata={"help": "factor grid step, the finest move"})
    initial_step: float = field(default=0.2, metadata={"help": "pattern search: first move size"})
    low: float = field(default=0.0, metadata={"help": "pattern search: smallest factor tried"})
    high: float = field(default=4.0, metadata={"help": "pattern search: largest factor tried"})


def pattern_start(n_bands: int = 2) -> Factors:
    """Pattern search's start: 1.8 on the first band, the identity factor 1 on the others."""
    return (1.8,) + (1.0,) * (n_bands - 1)


@STRATEGIES.register(
    "pattern",
    options=PatternOptions,
    help="compass search moving factors both ways with shrinking steps, from 1.8, 1, ..., 1",
)
def pattern_search(
    objective: Objective, n_bands: int, options: PatternOptions = PatternOptions(), start: Sequence[float] | None = None
) -> SearchResult:
    """Compass (pattern) search on the factor grid, maximising the objective within ``options.budget`` calls.

    From the incumbent, try one move of the current size along each coordinate in both directions, the last
    successful direction first; move to the first point that scores strictly higher. When no move improves, halve
    the size in grid units (0.2 -> 0.1, or 0.4 -> 0.2 -> 0.1); stop after a full poll at one grid step finds no
    gain, which leaves a grid point none of whose 2K neighbours is better. Unlike the reference it can lower a
    factor, and its larger early moves cross a wide range in few calls. Points are clipped to [low, high] and each
    grid point is evaluated once. The budget is a hard cap on real evaluations.

    The default start, ``pattern_start(K)`` = (1.8, 1, ..., 1), is the reference's start with the later bands at the
    identity factor: the reference's own second point, since its first move on a zero band is the jump to 1.
    ``bench/search_compare.py`` measures this start and the initial step against the reference on random smooth
    objectives at equal budgets.
    """
    check_budget(options.budget)
    grid = Grid(options.step)
    start = pattern_start(n_bands) if start is None else tuple(start)
    if len(start) != n_bands:
        raise ValueError(f"start {start} has {len(start)} factors for {n_bands} bands")
    point = grid.to_units(start)
    box = grid.to_units((options.low, options.high))
    if box[0] > box[1]:
        raise ValueError(f"pattern search bounds: low {options.low} > high {options.high}")
    if any(not box[0] <= u <= box[1] for u in point):
        raise ValueError(f"start {start} lies outside the bounds [{options.low}, {options.high}]")
    size = max(1, grid.to_units((options.initial_step,))[0])
    recorder = Recorder(objective, grid, options.budget)
    try:
        incumbent = recorder.score(point)
        recorder.mark(True, incumbent)
        last = None
        while size >= 1:
            last = _poll_once(recorder, point, incumbent, size, box, last)
            if last is None:
                size //= 2
                continue
            point = _move(point, last, size, box)
            incumbent = recorder.scores[point]
    except BudgetSpent:
        return recorder.result("pattern", "budget")
    return recorder.result("pattern", "converged")


def _poll_order(k: int, last: tuple[int, int] | None) -> list[tuple[int, int]]:
    """Directions as (coordinate, sign): the last successful one first (momentum), then +e0, -e0, +e1, ..."""
    directions = [(i, sign) for i in range(k) for sign in (1, -1)]
    if last is not None:
        directions.remove(last)
        directions.insert(0, last)
    return directions


def _move(point: Units, direction: tuple[int, int], size: int, box: tuple[int, int]) -> Units:
    i, sign = direction
    moved = list(point)
    moved[i] = min(box[1], max(box[0], point[i] + sign * size))
    return tuple(moved)


def _poll_once(recorder: Recorder, point: Units, incumbent: float, size: int, box, last):
    """Try the neighbours of ``point`` at ``size``; return the first improving direction, or None."""
    for direction in _poll_order(len(point), last):
        candidate = _move(point, direction, size, box)
        if candidate == point:
            continue
        score = recorder.score(candidate)
        improved = score > incumbent
        recorder.mark(improved, score if improved else incumbent)
        if improved:
            return direction
    return None
