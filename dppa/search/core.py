"""What every factor-search strategy shares: the factor grid, the budgeted and memoised objective, the trace.

A strategy (``dppa.search.registry.STRATEGIES``) maximises ``objective(factors) -> float`` over factor vectors
``(alpha_1, ..., alpha_K)``, one factor per significance band (docs/method.md, "Searching the factors"). Every
strategy works on the grid ``step * integer``: points are held as integer grid units, so float drift can never change
a path, and factors are compared and memoised exactly. Within one search the objective is called at most once per
grid point; the caller adds a persistent cache (``dppa.evaluation.cache``) to avoid repeats across runs.

Each strategy returns a ``SearchResult`` whose trace lists every real objective call, ready for JSON or CSV.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

Factors = tuple[float, ...]
Objective = Callable[[Factors], float]
Units = tuple[int, ...]


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

    def trace_rows(self, names: Sequence[str] | None = None) -> list[dict]:
        """Flat rows (index, alpha_1..alpha_K, score, accepted, best_score) for csv.DictWriter or a DVC plot;
        `names` names the point's coordinates instead of alpha_1..alpha_K (the merge search's scale and weights)."""
        rows = []
        for ev in self.trace:
            row: dict = {"index": ev.index}
            row.update({names[i] if names else f"alpha_{i + 1}": f for i, f in enumerate(ev.factors)})
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
    def from_dict(cls, data: dict) -> SearchResult:
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


class BudgetSpent(Exception):
    """Raised by the recorder when a new objective call would exceed max_evals."""


@dataclass
class Recorder:
    """Calls the objective at most once per grid point, counts calls against the budget and keeps the trace."""

    objective: Objective
    grid: Grid
    max_evals: int
    trace: list[Evaluation] = field(default_factory=list)
    scores: dict[Units, float] = field(default_factory=dict)
    unmarked: bool = False  # the last score() was a real call whose decision mark() has not recorded yet

    @property
    def remaining(self) -> int:
        return self.max_evals - len(self.trace)

    def score(self, units: Units, *, beyond_budget: bool = False) -> float:
        """The objective at ``units`` (memoised); a new point past the budget raises BudgetSpent unless
        ``beyond_budget`` (a call the strategy's own budget rule guarantees, such as a band's first probe)."""
        if units in self.scores:
            return self.scores[units]
        if self.remaining <= 0 and not beyond_budget:
            raise BudgetSpent
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


def check_budget(max_evals: int) -> None:
    if max_evals < 1:
        raise ValueError(f"the search budget must allow at least one evaluation, got {max_evals}")
