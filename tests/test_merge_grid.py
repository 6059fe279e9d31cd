"""The merge search's walk (dppa.search.merge_grid) on an objective with a known best, counted by hand."""

import pytest

from dppa.search.merge_grid import merge_grid_search


def test_scales_then_each_weight_then_the_scales_again():
    calls = []

    def objective(point):
        calls.append(point)
        scale, w1, w2 = point
        return -((scale * w1 - 1.0) ** 2) - (scale * w2 - 0.5) ** 2  # best at scale 0.5, w = (2, 1)

    result = merge_grid_search(objective, [0.5, 1.0], [0.5, 1.0, 2.0], start_weights=(1.0, 1.0))
    # by hand: at weights (1, 1) both scales score -0.25 and the earlier, 0.5, stays; w1 at scale 0.5: 0.5 gives
    # -0.5625, 2 gives 0 (taken); w2: 0.5 gives -0.0625, 2 gives -0.25 (1 stays); then scale 1 at (2, 1): -1.25
    assert calls == [
        (0.5, 1.0, 1.0),
        (1.0, 1.0, 1.0),
        (0.5, 0.5, 1.0),
        (0.5, 2.0, 1.0),
        (0.5, 2.0, 0.5),
        (0.5, 2.0, 2.0),
        (1.0, 2.0, 1.0),
    ]
    assert len(set(calls)) == len(calls)
    assert result.best_factors == (0.5, 2.0, 1.0) and result.best_score == pytest.approx(0.0)
    assert [r["scale"] for r in result.trace_rows(["scale", "w1", "w2"])] == [p[0] for p in calls]


def test_ties_keep_the_earlier_point_and_nothing_better_keeps_the_start():
    result = merge_grid_search(lambda point: 1.0, [0.3, 0.7], [0.5, 2.0], start_weights=(1.0, 1.0))
    assert result.best_factors == (0.3, 1.0, 1.0)
    assert [ev.accepted for ev in result.trace] == [True] + [False] * (len(result.trace) - 1)


def test_a_scale_search_alone():
    result = merge_grid_search(lambda point: -abs(point[0] - 0.7), [0.3, 0.5, 0.7, 1.0])
    assert result.best_factors == (0.7,) and result.n_evals == 4
