"""The one normalised score (dppa.evaluation.objective), on hand-computed cases."""

import math

import pytest

from dppa.evaluation.objective import (
    gain_kept,
    geometric_mean,
    mean_gain_kept,
    normalised_score,
    objective,
    ratio,
    task_owners,
)


def test_normalised_score_is_the_geometric_mean_of_the_ratios_to_the_dense_finetune():
    assert normalised_score({"a": 0.5, "b": 0.8}, {"a": 0.5, "b": 0.4}) == pytest.approx(math.sqrt(1.0 * 2.0))
    assert normalised_score({"a": 0.0, "b": 0.8}, {"a": 0.5, "b": 0.4}) == 0.0  # a lost task sinks the score


def test_the_zero_rule_leaves_out_tasks_the_dense_finetune_scores_zero_on():
    assert normalised_score({"a": 0.4, "b": 0.3}, {"a": 0.8, "b": 0.0}) == pytest.approx(0.5)
    assert normalised_score({"a": 0.4}, {"a": 0.0}) is None
    assert ratio(0.3, 0.0) is None


def test_the_objective_falls_back_to_raw_scores_only_when_no_task_is_informative():
    assert objective({"a": 0.4, "b": 0.9}, {"a": 0.8, "b": 0.9}) == (pytest.approx(math.sqrt(0.5)), True)
    value, normalised = objective({"a": 0.25, "b": 0.64}, {"a": 0.0, "b": 0.0})
    assert value == pytest.approx(0.4) and normalised is False


def test_a_task_without_a_dense_score_is_refused():
    with pytest.raises(ValueError, match="b"):
        normalised_score({"a": 0.5, "b": 0.4}, {"a": 0.5})


def test_gain_kept_is_capped_at_one_and_undefined_without_a_gain():
    assert gain_kept(0.5, dense=0.8, base=0.2) == pytest.approx(0.5)
    assert gain_kept(0.9, dense=0.8, base=0.2) == 1.0
    assert gain_kept(0.1, dense=0.8, base=0.2) == pytest.approx(-1 / 6)
    assert gain_kept(0.5, dense=0.2, base=0.2) is None
    assert mean_gain_kept({"a": 0.5, "b": 0.3}, {"a": 0.8, "b": 0.3}, {"a": 0.2, "b": 0.3}) == pytest.approx(0.5)


def test_geometric_mean_and_owners():
    assert geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        geometric_mean([])
    assert task_owners({"x": ["t1", "t2"], "y": ["t2", "t3"]}) == {"t1": "x", "t2": "x", "t3": "y"}
