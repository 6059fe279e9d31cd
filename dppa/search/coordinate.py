"""The reference implementation's search: greedy coordinate ascent over the band factors (docs/method.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from dppa.search.core import BudgetSpent, Factors, Grid, Objective, Recorder, SearchResult, check_budget
from dppa.search.registry import STRATEGIES


@dataclass(frozen=True)
class CoordinateOptions:
    budget: int = field(default=100, metadata={"help": "most candidate evaluations"})
    step: float = field(default=0.1, metadata={"help": "factor grid step (0.1 is the reference's)"})
    probe_every_band: bool = field(
        default=True, metadata={"help": "the budget never stops the walk before every band's factor was probed once"}
    )


def reference_start(n_bands: int = 2) -> Factors:
    """The reference's start for K bands: 1.8 on band 1 (the most significant entries), 0 on the others."""
    return (1.8,) + (0.0,) * (n_bands - 1)


@STRATEGIES.register(
    "coordinate",
    options=CoordinateOptions,
    help="the reference's greedy coordinate ascent from 1.8, 0, ..., 0 (alias: reference)",
)
def coordinate_ascent(
    objective: Objective,
    n_bands: int,
    options: CoordinateOptions = CoordinateOptions(),
    start: Sequence[float] | None = None,
) -> SearchResult:
    """The reference's greedy coordinate ascent over K band factors, rule for rule.

    State: ``alpha = start`` (default ``reference_start(K)`` = (1.8, 0, ..., 0)), ``best = 0``, ``k = 0``.
    Repeat: evaluate ``alpha``;
    - if its score is strictly greater than ``best``: accept it (``best = score``) and add one step to ``alpha[k]``;
    - otherwise: if ``alpha[k] > 1`` subtract one step; move to ``k + 1``; there, set ``alpha[k]`` to 1 if it is
      below one step (i.e. 0), else add one step; stop once the last coordinate has been left.

    Budget (``options.budget``, a cap on real evaluations the reference does not have): with ``probe_every_band``
    (the default) the cap never stops the walk before every band was probed once. The walk on band k keeps one
    evaluation in reserve for the first probe of each later band: when only that reserve is left, it leaves band k
    at its last accepted value, as after a rejection, and goes on. So the total stays within the budget, the
    first probe of every band is made even when a budget below K forces the total up to K, and ``stop_reason`` is
    "budget" when a band's walk was cut short. With ``probe_every_band=False`` the budget is a hard stop
    wherever the walk is.

    Readings of the rule, where it leaves room:
    - The step back undoes the rejected increment, so after at least one acceptance on coordinate ``k`` the walk
      continues from the last accepted value of ``alpha[k]``. When the rejected value is the coordinate's first
      probe, the rule is applied literally, as the reference does: a first probe above 1 (the start 1.8 scoring
      <= 0) is lowered to 1.7, which was never evaluated; a first probe of exactly 1 (the value a zero coordinate
      jumps to) is kept, because 1 is not > 1. Either way the walk's later points are real evaluations.
    - ``best`` starts at 0, so a score of 0 (or below) is never accepted: with an objective that is 0 at the start
      (a broken candidate) the search moves on to the next coordinate at once.
    - The result is the highest score evaluated, earliest on ties; for this search that is exactly the last
      accepted point whenever any point was accepted (acceptance needs a strict gain over every earlier score).
    - "0.1" in the rule is the step and "1" the identity factor; with another step the same rule is used on
      that grid.
    """
    check_budget(options.budget)
    grid = Grid(options.step)
    start = reference_start(n_bands) if start is None else tuple(start)
    if len(start) != n_bands:
        raise ValueError(f"start {start} has {len(start)} factors for {n_bands} bands")
    alpha = list(grid.to_units(start))
    one = grid.to_units((1.0,))[0]
    recorder = Recorder(objective, grid, options.budget)
    best = 0.0
    k = 0
    first_probe = True  # the next evaluation is band k's first
    cut_short = False

    def leave_band() -> int:
        nonlocal first_probe
        first_probe = True
        if k + 1 < n_bands:
            alpha[k + 1] = one if alpha[k + 1] < 1 else alpha[k + 1] + 1
        return k + 1

    try:
        while k < n_bands:
            point = tuple(alpha)
            reserve = n_bands - 1 - k if options.probe_every_band else 0
            if not first_probe and point not in recorder.scores and recorder.remaining <= reserve:
                # Only the later bands' first probes are left in the budget: keep the last accepted value.
                cut_short = True
                alpha[k] -= 1
                k = leave_band()
                continue
            score = recorder.score(point, beyond_budget=first_probe and options.probe_every_band)
            first_probe = False
            if score > best:
                best = score
                recorder.mark(True, best)
                alpha[k] += 1
                continue
            recorder.mark(False, best)
            if alpha[k] > one:
                alpha[k] -= 1
            k = leave_band()
    except BudgetSpent:
        return recorder.result("coordinate", "budget")
    return recorder.result("coordinate", "budget" if cut_short else "converged")
