"""The claims check of experiments/claims.py on hand-made tables: paired differences, the spread rule, verdicts."""

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from claims import claims_markdown, compare, verdict  # noqa: E402


def test_a_difference_counts_only_beyond_the_spread_of_the_paired_differences():
    # differences 0.10, 0.12, 0.08: mean 0.10 > std 0.02 -> counts, A ahead
    counted = compare({0: 0.9, 1: 0.92, 2: 0.88}, {0: 0.8, 1: 0.8, 2: 0.8})
    assert counted["diff"] == pytest.approx(0.10) and counted["spread"] == pytest.approx(0.02) and counted["sign"] == 1
    # differences +0.1, -0.1, +0.05: mean 0.0167 < std 0.104 -> no difference
    assert compare({0: 0.9, 1: 0.7, 2: 0.85}, {0: 0.8, 1: 0.8, 2: 0.8})["sign"] == 0
    # one seed: never counts; only seeds present on both sides are paired
    assert compare({0: 0.9}, {0: 0.1, 1: 0.5})["sign"] == 0
    assert (
        verdict([1, 1]) == "reproduced" and verdict([0, -1]) == "not reproduced" and verdict([1, 0]) == "inconclusive"
    )
    assert verdict([]) == "inconclusive"


def row(regime: str, seed: int, finetune: str, method: str, density: float, normalised: float) -> dict:
    """One row of the grid's per-fine-tune table (pruning.csv)."""
    return {
        "zoo.regime": regime,
        "seed": seed,
        "finetune": finetune,
        "method": method,
        "density": density,
        "normalised": normalised,
    }


def test_claims_read_the_grid_tables():
    rows = []
    for seed, (dp, mag) in enumerate([(0.8, 0.5), (0.82, 0.5), (0.78, 0.52)]):
        for regime in ("heavy", "light"):
            for finetune in ("a", "b"):
                rows += [row(regime, seed, finetune, "dp", 0.1, dp), row(regime, seed, finetune, "magnitude", 0.1, mag)]
    merging = pd.DataFrame(columns=["zoo.regime", "combination", "seed", "task", "normalised"])
    text = claims_markdown(pd.DataFrame(rows), merging)
    assert "| heavy, density 0.1: DP - magnitude | 0.800 ± 0.020 | 0.507 ± 0.012 | +0.293 |" in text
    # (b) has density 0.2 comparisons without data: not every comparison supports it -> inconclusive, not reproduced
    assert "## (b) DP beats magnitude pruning at high pruning rates: **inconclusive**" in text
    assert "| heavy, density 0.2: DP - magnitude | - | - | - | - | 0 |" in text


def test_comparable_needs_two_seeds_and_no_loss_beyond_the_spread():
    rows = []
    for seed, (dppa, other) in enumerate([(0.91, 1.0), (0.90, 1.0)]):
        rows += [row("heavy", seed, "a", "dppa", 0.2, dppa), row("heavy", seed, "a", "magnitude", 0.9, other)]
    merging = pd.DataFrame(columns=["zoo.regime", "combination", "seed", "task", "normalised"])
    text = claims_markdown(pd.DataFrame(rows), merging)
    # DPPA 0.2 is 0.095 below magnitude 0.9 with a spread of 0.007: worse, so not comparable
    assert "## (c) DPPA at density 0.2 is comparable to other pruning at 0.9: **not reproduced**" in text
    one_seed = claims_markdown(pd.DataFrame(rows[:2]), merging)
    assert "## (c) DPPA at density 0.2 is comparable to other pruning at 0.9: **inconclusive**" in one_seed
