"""Search of DPPA's band factors against a score (spec section 3).

A strategy maximises ``objective(factors) -> float`` over factor vectors ``(alpha_1, ..., alpha_K)``, one factor per
significance band. Every strategy works on the grid ``step * integer`` (0.1 by default): points are held as integer
grid units, so float drift can never change a path, and factors are compared and memoised exactly. Within one search
the objective is called at most once per grid point; the caller adds a persistent cache (``dppa.evaluation.cache``) to avoid
repeats across runs.

Strategies:
- ``coordinate_ascent_reference``: the reference implementation's greedy coordinate ascent (the default).
- ``pattern_search``: compass search in both directions with shrinking steps; same budget semantics.

Each returns a ``SearchResult`` whose trace lists every real objective call, ready for JSON or CSV.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

Factors = tuple[float, ...]
Objective = Callable[[Factors], float]
Units = tuple[int, ...]

STRATEGIES = ("coordinate", "pattern")


def reference_start(n_bands: int = 2) -> Factors:
    """The reference's start for K bands: 1.8 on band 1 (the most significant entries), 0 on the others."""
    return (1.8,) + (0.0,) * (n_bands - 1)


def pattern_start(n_bands: int = 2) -> Factors:
    """Pattern search's start: 1.8 on the first band, the identity factor 1 on the others."""
    return (1.8,) + (1.0,) * (n_bands - 1)


@dataclass(frozen=True)
class Evaluation:
    """One real objective call: its position in the search, the point, its score, and the search state after it."""

    index: int
    factors: Factors
    score: float
    accepted: bool  # the strategy took this point as its new incumbent
    best_score: float  # the incumbent's score after this call


@dataclass
class SearchResult:
    strategy: str
    best_factors: Factors
    best_score: float
    trace: list[Evaluation]
    stop_reason: str  # "converged" (the strategy's own rule ended it) or "budget" (max_evals reached)

    @property
    def n_evals(self) -> int:
        return len(self.trace)

    def trace_rows(self) -> list[dict]:
        """Flat rows (index, alpha_1..alpha_K, score, accepted, best_score) for csv.DictWriter or a DVC plot."""
        rows = []
        for ev in self.trace:
            row: dict = {"index": ev.index}
            row.update({f"alpha_{i + 1}": f for i, f in enumerate(ev.factors)})
            row.update(score=ev.score, accepted=ev.accepted, best_score=ev.best_score)
            rows.append(row)
        return rows

    def to_dict(self) -> dict:
        """JSON-serialisable summary plus the full trace."""
        return {
            "strategy": self.strategy,
            "best_factors": list(self.best_factors),
            "best_score": self.best_score,
            "n_evals": self.n_evals,
            "stop_reason": self.stop_reason,
            "trace": [asdict(ev) | {"factors": list(ev.factors)} for ev in self.trace],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SearchResult":
        trace = [Evaluation(**(ev | {"factors": tuple(ev["factors"])})) for ev in data["trace"]]
        return cls(data["strategy"], tuple(data["best_factors"]), data["best_score"], trace, data["stop_reason"])


@dataclass(frozen=True)
class Grid:
    """Factors are multiples of ``step``; positions are held as integers so arithmetic is exact."""

    step: float = 0.1

    def __post_init__(self):
        if not self.step > 0:
            raise ValueError(f"search step must be positive, got {self.step}")

    def to_units(self, factors: Sequence[float]) -> Units:
        units = tuple(round(f / self.step) for f in factors)
        for f, u in zip(factors, units):
            if not math.isclose(u * self.step, f, abs_tol=1e-9):
                raise ValueError(f"factor {f} is not a multiple of the search step {self.step}")
        return units

    def to_factors(self, units: Units) -> Factors:
        # Rounding to 10 decimals removes representation noise such as 18 * 0.1 = 1.8000000000000003.
        return tuple(round(u * self.step, 10) for u in units)


class _BudgetSpent(Exception):
    """Raised by the recorder when a new objective call would exceed max_evals."""


@dataclass
class _Recorder:
    """Calls the objective at most once per grid point, counts calls against the budget and keeps the trace."""

    objective: Objective
    grid: Grid
    max_evals: int
    trace: list[Evaluation] = field(default_factory=list)
    scores: dict[Units, float] = field(default_factory=dict)
    unmarked: bool = False  # the last score() was a real call whose decision mark() has not recorded yet

    def score(self, units: Units) -> float:
        if units in self.scores:
            return self.scores[units]
        if len(self.trace) >= self.max_evals:
            raise _BudgetSpent
        factors = self.grid.to_factors(units)
        value = float(self.objective(factors))
        if math.isnan(value):
            raise ValueError(f"objective returned NaN for factors {factors}")
        self.scores[units] = value
        # accepted/best_score are filled in by the strategy through mark(), which knows its own acceptance rule.
        self.trace.append(Evaluation(len(self.trace), factors, value, False, value))
        self.unmarked = True
        return value

    def mark(self, accepted: bool, best_score: float) -> None:
        """Record the strategy's decision about the last real call (no-op after a memoised lookup)."""
        if self.unmarked:
            last = self.trace[-1]
            self.trace[-1] = Evaluation(last.index, last.factors, last.score, accepted, best_score)
            self.unmarked = False

    def result(self, strategy: str, stop_reason: str) -> SearchResult:
        if not self.trace:
            raise ValueError("max_evals must allow at least one evaluation")
        # Highest score seen, earliest on ties: for the reference search this is exactly its last accepted point.
        best = max(self.trace, key=lambda ev: (ev.score, -ev.index))
        return SearchResult(strategy, best.factors, best.score, list(self.trace), stop_reason)


def _check_budget(max_evals: int) -> None:
    if max_evals < 1:
        raise ValueError(f"max_evals must be at least 1, got {max_evals}")


def coordinate_ascent_reference(
    objective: Objective,
    start: Sequence[float] | None = None,
    step: float = 0.1,
    max_evals: int = 100,
) -> SearchResult:
    """The reference's greedy coordinate ascent over K band factors, rule for rule (spec section 3).

    State: ``alpha = start`` (default ``reference_start()`` = (1.8, 0)), ``best = 0``, ``k = 0``.
    Repeat: evaluate ``alpha``;
    - if its score is strictly greater than ``best``: accept it (``best = score``) and add one step to ``alpha[k]``;
    - otherwise: if ``alpha[k] > 1`` subtract one step; move to ``k + 1``; there, set ``alpha[k]`` to 1 if it is
      below one step (i.e. 0), else add one step; stop once the last coordinate has been left.

    Readings of the spec, where it leaves room:
    - The step back undoes the rejected increment, so after at least one acceptance on coordinate ``k`` the walk
      continues from the last accepted value of ``alpha[k]``. When the rejected value is the coordinate's first
      probe, the rule is applied literally, as the reference does: a first probe above 1 (the start 1.8 scoring
      <= 0) is lowered to 1.7, which was never evaluated; a first probe of exactly 1 (the value a zero coordinate
      jumps to) is kept, because 1 is not > 1. Either way the walk's later points are real evaluations.
    - ``best`` starts at 0, so a score of 0 (or below) is never accepted: with an objective that is 0 at the start
      (a broken candidate) the search moves on to the next coordinate at once.
    - The result is the highest score evaluated, earliest on ties; for this search that is exactly the last
      accepted point whenever any point was accepted (acceptance needs a strict gain over every earlier score).
      If none was accepted (every score <= 0) it is the earliest of the highest scores.
    - "0.1" in the rule is the step and "1" the identity factor; with another ``step`` the same rule is used on
      that grid. The reference has no evaluation cap; ``max_evals`` stops an objective that keeps improving.
    """
    _check_budget(max_evals)
    grid = Grid(step)
    alpha = list(grid.to_units(start if start is not None else reference_start()))
    one = grid.to_units((1.0,))[0]
    recorder = _Recorder(objective, grid, max_evals)
    best = 0.0
    k = 0
    try:
        while k < len(alpha):
            score = recorder.score(tuple(alpha))
            if score > best:
                best = score
                recorder.mark(True, best)
                alpha[k] += 1
                continue
            recorder.mark(False, best)
            if alpha[k] > one:
                alpha[k] -= 1
            k += 1
            if k < len(alpha):
                alpha[k] = one if alpha[k] < 1 else alpha[k] + 1
    except _BudgetSpent:
        return recorder.result("coordinate", "budget")
    return recorder.result("coordinate", "converged")


def _bounds_units(grid: Grid, bounds: Sequence, k: int) -> list[tuple[int, int]]:
    """Accept one (low, high) pair for every coordinate or one pair per coordinate."""
    pairs = [tuple(bounds)] * k if len(bounds) == 2 and not isinstance(bounds[0], (tuple, list)) else list(bounds)
    if len(pairs) != k:
        raise ValueError(f"need one (low, high) bound per factor ({k}), got {len(pairs)}")
    units = [grid.to_units(pair) for pair in pairs]
    if any(lo > hi for lo, hi in units):
        raise ValueError(f"each bound must have low <= high, got {bounds}")
    return units


def _poll_order(k: int, last: tuple[int, int] | None) -> list[tuple[int, int]]:
    """Directions as (coordinate, sign): the last successful one first (momentum), then +e0, -e0, +e1, ..."""
    directions = [(i, sign) for i in range(k) for sign in (1, -1)]
    if last is not None:
        directions.remove(last)
        directions.insert(0, last)
    return directions


def _move(point: Units, direction: tuple[int, int], size: int, bounds: list[tuple[int, int]]) -> Units:
    i, sign = direction
    lo, hi = bounds[i]
    moved = list(point)
    moved[i] = min(hi, max(lo, point[i] + sign * size))
    return tuple(moved)


def pattern_search(
    objective: Objective,
    start: Sequence[float] | None = None,
    step: float = 0.1,
    max_evals: int = 20,
    initial_step: float = 0.2,
    bounds: Sequence = (0.0, 4.0),
) -> SearchResult:
    """Compass (pattern) search on the factor grid, maximising the objective within ``max_evals`` calls.

    From the incumbent, try one move of the current size along each coordinate in both directions, the last
    successful direction first; move to the first point that scores strictly higher. When no move improves, halve
    the size in grid units (0.2 -> 0.1, or 0.4 -> 0.2 -> 0.1); stop after a full poll at one grid step finds no
    gain, which leaves a grid point none of whose 2K neighbours is better. Unlike the reference it can lower a
    factor, and its larger early moves cross a wide range in few calls. Points are clipped to ``bounds`` (one (low, high) pair for
    all factors, or one per factor) and each grid point is evaluated once.

    The default start, ``pattern_start()`` = (1.8, 1), is the reference's start with the later bands at the identity
    factor: the reference's own second point, since its first move on a zero band is the jump to 1.
    ``bench/search_compare.py`` measures this start and the initial step against the reference on random smooth
    objectives at equal budgets.
    """
    _check_budget(max_evals)
    grid = Grid(step)
    start = tuple(start) if start is not None else pattern_start()
    point = grid.to_units(start)
    box = _bounds_units(grid, bounds, len(point))
    if any(not lo <= u <= hi for u, (lo, hi) in zip(point, box)):
        raise ValueError(f"start {start} lies outside the bounds {bounds}")
    size = max(1, grid.to_units((initial_step,))[0])
    recorder = _Recorder(objective, grid, max_evals)
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
    except _BudgetSpent:
        return recorder.result("pattern", "budget")
    return recorder.result("pattern", "converged")


def _poll_once(recorder: _Recorder, point: Units, incumbent: float, size: int, box, last):
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


def run_strategy(name: str, objective: Objective, **options) -> SearchResult:
    """Dispatch by strategy name ("coordinate" or "pattern") with that strategy's keyword options."""
    if name == "coordinate":
        return coordinate_ascent_reference(objective, **options)
    if name == "pattern":
        return pattern_search(objective, **options)
    raise ValueError(f"unknown search strategy {name!r}; choose one of {', '.join(STRATEGIES)}")


def normalised_geomean(scores: dict[str, float], reference: dict[str, float]) -> float:
    """Spec section 3's objective: geometric mean over tasks of score_t(candidate) / score_t(dense fine-tune)."""
    if not scores or set(scores) != set(reference):
        raise ValueError(f"candidate tasks {sorted(scores)} differ from reference tasks {sorted(reference)}")
    ratios = []
    for task, value in scores.items():
        if reference[task] <= 0:
            raise ValueError(f"the dense fine-tune scores {reference[task]} on {task}; cannot normalise by it")
        ratios.append(value / reference[task])
    if any(r <= 0 for r in ratios):
        return 0.0
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))
