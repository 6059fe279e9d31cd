"""Compare the factor-search strategies at equal evaluation budgets on random smooth objectives.

For each trial: a Gaussian bump over (alpha_A, alpha_B) with a random optimum and widths; on half the trials band A's
effective factor is max(alpha_A, alpha_B), as under DPPA's combination rule. The reference coordinate ascent runs
first; pattern search then gets exactly as many objective calls as the reference used. Prints, per pattern-search
setting, the mean score gain over the reference and how often it wins or loses.

    python bench/search_compare.py --trials 400 --seed 0
"""

from __future__ import annotations

import argparse
import math
import random
import statistics

from dppa.search.coordinate import coordinate_ascent, reference_start
from dppa.search.pattern import PatternOptions, pattern_search

SETTINGS = {
    "start (1.8, 0), step 0.4": dict(start=reference_start(), initial_step=0.4),
    "start (1.8, 0), step 0.2": dict(start=reference_start(), initial_step=0.2),
    "start (1.8, 1), step 0.4": dict(start=(1.8, 1.0), initial_step=0.4),
    "start (1.8, 1), step 0.2 (default)": dict(),
    "start (1.8, 1), step 0.1": dict(start=(1.8, 1.0), initial_step=0.1),
}


def bump(optimum, widths, max_rule: bool):
    def objective(factors):
        a, b = factors
        if max_rule:
            a = max(a, b)
        return math.exp(-(((a - optimum[0]) / widths[0]) ** 2) - ((b - optimum[1]) / widths[1]) ** 2)

    return objective


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    gains = {name: [] for name in SETTINGS}
    budgets = []
    for trial in range(args.trials):
        optimum = (rng.uniform(0.8, 3.0), rng.uniform(0.3, 2.5))
        widths = (rng.uniform(0.3, 1.5), rng.uniform(0.3, 1.5))
        objective = bump(optimum, widths, max_rule=trial % 2 == 0)
        reference = coordinate_ascent(objective, 2)
        budgets.append(reference.n_evals)
        for name, options in SETTINGS.items():
            options = dict(options)
            start = options.pop("start", None)
            found = pattern_search(objective, 2, PatternOptions(budget=reference.n_evals, **options), start=start)
            gains[name].append(found.best_score - reference.best_score)
    print(f"{args.trials} trials, reference used {statistics.mean(budgets):.1f} evaluations on average")
    print(f"{'pattern search setting':38s} {'mean gain':>9s} {'wins':>5s} {'losses':>6s} {'worst':>7s}")
    for name, values in gains.items():
        wins = sum(v > 1e-12 for v in values)
        losses = sum(v < -1e-12 for v in values)
        print(f"{name:38s} {statistics.mean(values):9.4f} {wins:5d} {losses:6d} {min(values):7.3f}")


if __name__ == "__main__":
    main()
