"""The factor searches: the reference's exact path, budgets, memoisation, the stronger strategy, the trace."""

import csv
import io
import json
import math
from collections import Counter

import pytest

from dppa.errors import DppaError
from dppa.search.core import SearchResult
from dppa.search.registry import STRATEGIES


def run(name, objective, n_bands=2, start=None, **options):
    """A strategy through the registry, as the search runner calls it."""
    entry = STRATEGIES.get(name)
    return entry.impl(objective, n_bands, entry.options(**options), start=start)


def coordinate_ascent_reference(objective, start=None, **options):
    return run("coordinate", objective, len(start) if start else 2, start, **options)


def pattern_search(objective, start=None, **options):
    return run("pattern", objective, len(start) if start else 2, start, **options)


class Scripted:
    """An objective defined by a table; any point outside it fails the test, so the path must match exactly."""

    def __init__(self, table: dict):
        self.table = table
        self.calls: list[tuple] = []

    def __call__(self, factors):
        self.calls.append(factors)
        assert factors in self.table, f"search evaluated unscripted factors {factors}"
        return self.table[factors]


def gaussian(optimum, widths=(0.6, 0.8)):
    def objective(factors):
        return math.exp(-sum(((f - o) / w) ** 2 for f, o, w in zip(factors, optimum, widths)))

    return objective


def test_reference_path_step_by_step():
    objective = Scripted(
        {
            (1.8, 0.0): 0.50,  # start values; beats best = 0: accepted, alpha_A += 0.1
            (1.9, 0.0): 0.60,  # accepted, alpha_A += 0.1
            (2.0, 0.0): 0.55,  # rejected: alpha_A steps back to 1.9; switch to B, which jumps from 0 to 1
            (1.9, 1.0): 0.70,  # accepted, alpha_B += 0.1
            (1.9, 1.1): 0.72,  # accepted
            (1.9, 1.2): 0.72,  # a tie is not better: rejected, step back, last coordinate left: stop
        }
    )
    result = coordinate_ascent_reference(objective)
    assert objective.calls == list(objective.table)
    assert [ev.accepted for ev in result.trace] == [True, True, False, True, True, False]
    assert [ev.best_score for ev in result.trace] == [0.50, 0.60, 0.60, 0.70, 0.72, 0.72]
    assert result.best_factors == (1.9, 1.1)
    assert result.best_score == 0.72
    assert result.stop_reason == "converged"


def test_reference_first_score_zero_steps_alpha_a_down_literally():
    # best starts at 0 and 0 is not better; alpha_A = 1.8 > 1, so the literal rule lowers it to 1.7 unevaluated.
    objective = Scripted({(1.8, 0.0): 0.0, (1.7, 1.0): 0.4, (1.7, 1.1): 0.3})
    result = coordinate_ascent_reference(objective)
    assert objective.calls == [(1.8, 0.0), (1.7, 1.0), (1.7, 1.1)]
    assert [ev.accepted for ev in result.trace] == [False, True, False]
    assert result.best_factors == (1.7, 1.0)


def test_reference_rejected_first_probe_of_one_is_not_stepped_back():
    # alpha_B = 1.0 is rejected; 1 is not > 1 so no step back; the search ends and keeps the last accepted point.
    objective = Scripted({(1.8, 0.0): 0.5, (1.9, 0.0): 0.4, (1.8, 1.0): 0.45})
    result = coordinate_ascent_reference(objective)
    assert objective.calls == [(1.8, 0.0), (1.9, 0.0), (1.8, 1.0)]
    assert result.best_factors == (1.8, 0.0)
    assert result.best_score == 0.5


def test_reference_with_three_bands_and_a_nonzero_start_adds_one_step():
    objective = Scripted(
        {
            (1.8, 0.0, 0.5): 0.5,
            (1.9, 0.0, 0.5): 0.4,  # back to 1.8; B: 0 -> 1
            (1.8, 1.0, 0.5): 0.6,
            (1.8, 1.1, 0.5): 0.5,  # back to 1.0; C: 0.5 is not below 0.1, so 0.5 + 0.1
            (1.8, 1.0, 0.6): 0.7,
            (1.8, 1.0, 0.7): 0.1,
        }
    )
    result = coordinate_ascent_reference(objective, start=(1.8, 0.0, 0.5))
    assert objective.calls == list(objective.table)
    assert result.best_factors == (1.8, 1.0, 0.6)


def test_reference_long_walk_has_no_float_drift():
    # alpha_A rises from 1.8 to 3.4 (rejected, back to 3.3); alpha_B jumps to 1.0 (above the 0.9 optimum, yet
    # better than 0) and 1.1 is rejected: the reference never lowers a factor.
    result = coordinate_ascent_reference(gaussian((3.3, 0.9)))
    assert [ev.factors for ev in result.trace] == [(round(1.8 + 0.1 * i, 1), 0.0) for i in range(17)] + [
        (3.3, 1.0),
        (3.3, 1.1),
    ]
    assert result.best_factors == (3.3, 1.0)


def test_budget_stops_an_objective_that_keeps_improving_after_probing_band_two():
    # Band 1 improves forever; band 2's first probe (to 1.0) is kept in reserve and scores no better.
    result = coordinate_ascent_reference(lambda f: f[0], budget=7)
    assert [ev.factors for ev in result.trace] == [
        (1.8, 0.0),
        (1.9, 0.0),
        (2.0, 0.0),
        (2.1, 0.0),
        (2.2, 0.0),
        (2.3, 0.0),
        (2.3, 1.0),
    ]
    assert result.stop_reason == "budget"
    assert result.best_factors == (2.3, 0.0)
    with pytest.raises(ValueError):
        coordinate_ascent_reference(lambda f: 1.0, budget=0)


def test_budget_of_twelve_probes_the_second_band():
    # params.yaml's budget of 12 used to be spent entirely on band 1 of an objective that keeps improving there.
    result = coordinate_ascent_reference(lambda f: 1 + f[0] + f[1], budget=12)
    assert result.n_evals == 12
    assert [ev.factors for ev in result.trace][-2:] == [(2.8, 0.0), (2.8, 1.0)]
    assert result.best_factors == (2.8, 1.0)


@pytest.mark.parametrize("n_bands", [1, 3, 4])
def test_every_band_is_probed_within_the_budget(n_bands):
    # Each band improves forever: the walk on band k stops with one evaluation left per later band.
    result = run("coordinate", lambda f: sum(f), n_bands, budget=10)
    assert result.n_evals == 10
    for k in range(n_bands):
        assert any(ev.factors[k] == 1.0 for ev in result.trace[1:]) or k == 0, f"band {k + 1} never probed"
    assert len(result.best_factors) == n_bands
    # Band 1 climbs until only the later bands' first probes are left; each of those is accepted and then cut.
    assert result.best_factors == (round(1.8 + 0.1 * (10 - n_bands), 1),) + (1.0,) * (n_bands - 1)


def test_a_budget_below_the_band_count_still_probes_each_band_once_unless_asked_not_to():
    result = run("coordinate", lambda f: sum(f), 3, budget=2)
    assert [ev.factors for ev in result.trace] == [(1.8, 0.0, 0.0), (1.8, 1.0, 0.0), (1.8, 1.0, 1.0)]
    hard = run("coordinate", lambda f: sum(f), 3, budget=2, probe_every_band=False)
    assert [ev.factors for ev in hard.trace] == [(1.8, 0.0, 0.0), (1.9, 0.0, 0.0)]
    assert hard.stop_reason == "budget"


def test_off_grid_start_is_refused():
    with pytest.raises(ValueError, match="multiple of the search step"):
        coordinate_ascent_reference(lambda f: 1.0, start=(1.85, 0.0))


def test_pattern_search_calls_objective_once_per_point_and_stops_at_a_grid_local_optimum():
    objective = gaussian((1.3, 1.6))
    counts = Counter()

    def counted(factors):
        counts[factors] += 1
        return objective(factors)

    result = pattern_search(counted, budget=60)
    assert result.stop_reason == "converged"
    assert max(counts.values()) == 1
    assert result.n_evals == len(counts)
    a, b = result.best_factors
    for neighbour in [(a + 0.1, b), (a - 0.1, b), (a, b + 0.1), (a, b - 0.1)]:
        assert objective(neighbour) <= result.best_score


def test_pattern_search_beats_reference_at_equal_budget_and_finds_the_optimum():
    # The optimum lies below the reference's start on alpha_A, which its upward-only walk cannot reach.
    objective = gaussian((1.3, 1.6))
    reference = coordinate_ascent_reference(objective)
    same_budget = pattern_search(objective, budget=reference.n_evals)
    assert same_budget.n_evals <= reference.n_evals
    assert same_budget.best_score > reference.best_score
    generous = pattern_search(objective, budget=30)
    assert generous.best_factors == (1.3, 1.6)


def test_pattern_search_respects_bounds():
    result = pattern_search(lambda f: -f[0] - f[1], start=(1.0, 1.1), low=0.8, high=1.2, budget=40)
    assert all(0.8 <= f <= 1.2 for ev in result.trace for f in ev.factors)
    assert result.best_factors == (0.8, 0.8)
    with pytest.raises(ValueError, match="outside the bounds"):
        pattern_search(lambda f: 1.0, low=0.0, high=1.5)


def test_pattern_search_walks_three_bands():
    result = run("pattern", gaussian((1.3, 1.6, 0.5), widths=(0.6, 0.8, 0.7)), 3, budget=80)
    assert result.stop_reason == "converged"
    assert result.best_factors == (1.3, 1.6, 0.5)


def test_pattern_trace_marks_incumbents():
    result = pattern_search(gaussian((2.0, 1.2)), budget=30)
    incumbents = [ev for ev in result.trace if ev.accepted]
    assert incumbents[0].index == 0
    assert [ev.score for ev in incumbents] == sorted(ev.score for ev in incumbents)
    assert incumbents[-1].factors == result.best_factors
    assert [ev.best_score for ev in result.trace] == [
        max(e.score for e in result.trace[: i + 1]) for i in range(result.n_evals)
    ]


def test_result_serialises_to_json_and_csv():
    result = run("coordinate", gaussian((2.0, 1.2)))
    restored = SearchResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert restored == result
    buffer = io.StringIO()
    rows = result.trace_rows()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    read_back = list(csv.DictReader(io.StringIO(buffer.getvalue())))
    assert list(read_back[0]) == ["index", "alpha_1", "alpha_2", "score", "accepted", "best_score"]
    assert [float(r["alpha_1"]) for r in read_back] == [ev.factors[0] for ev in result.trace]
    with pytest.raises(DppaError, match="unknown search strategy"):
        run("grid", gaussian((2.0, 1.2)))
