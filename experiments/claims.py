"""The paper's claims, checked against the grid's tables (experiments/results/{pruning,merging}.csv).

    python experiments/claims.py [--results experiments/results]      -> results/claims.md

Each claim is a set of comparisons between two cells of a table. A cell's value is, per seed, the mean over
fine-tunes (pruning) or over tasks (merging) of the score normalised by the dense fine-tune's; comparisons are paired
by seed (same zoo, same fine-tunes). A difference counts only when |mean| > the std of the per-seed differences
(with one seed: never, and the verdict is "inconclusive"). A claim is "reproduced" when every comparison goes its
way, "not reproduced" when none does and at least one goes the other way, else "inconclusive".
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import pandas as pd

PRUNING_KEYS = ["zoo.regime", "method", "density"]


def per_seed(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean normalised score per (keys, seed); duplicates (DPPA's row comes with each method's point) once."""
    frame = frame.dropna(subset=["normalised"]).drop_duplicates(subset=[*keys, "seed", *_unit(frame)])
    return frame.groupby([*keys, "seed"], as_index=False)["normalised"].mean()


def _unit(frame: pd.DataFrame) -> list[str]:
    return ["finetune"] if "finetune" in frame else ["task"]


def cell(values: pd.DataFrame, **where) -> dict[int, float]:
    """{seed: value} of one cell."""
    mask = pd.Series(True, index=values.index)
    for key, value in where.items():
        mask &= values[key] == value
    return dict(zip(values[mask]["seed"], values[mask]["normalised"]))


def compare(a: dict[int, float], b: dict[int, float]) -> dict:
    """a - b paired by seed: {"a", "b", "diff", "spread", "n", "sign"}; sign +1/-1 when the difference counts."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if not seeds:
        return {"n": 0, "sign": 0}
    mean = statistics.mean(diffs)
    spread = statistics.stdev(diffs) if len(diffs) > 1 else float("inf")
    return {
        "a": _ms([a[s] for s in seeds]),
        "b": _ms([b[s] for s in seeds]),
        "diff": mean,
        "spread": spread,
        "n": len(seeds),
        "sign": (1 if mean > 0 else -1) if abs(mean) > spread else 0,
    }


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def verdict(signs: list[int]) -> str:
    """Each comparison's sign as the claim expects it (+1 supports, -1 contradicts, 0 no difference)."""
    if signs and all(s > 0 for s in signs):
        return "reproduced"
    if signs and not any(s > 0 for s in signs) and any(s < 0 for s in signs):
        return "not reproduced"
    return "inconclusive"


def claim_rows(pruning: pd.DataFrame, merging: pd.DataFrame) -> list[tuple[str, list[tuple[str, dict, int]]]]:
    """[(claim, [(comparison label, comparison, the sign that supports the claim)])]."""
    p = per_seed(pruning, PRUNING_KEYS)
    m = per_seed(merging[merging["task"] != "scale"], ["zoo.regime", "combination"])
    regimes = sorted(set(p["zoo.regime"]) | set(m["zoo.regime"]))
    claims = []
    # (a) DARE keeps light fine-tunes and loses heavy ones: light DARE above heavy DARE at the same density and seed
    rows = []
    for density in (0.1, 0.2):
        light = cell(p, **{"zoo.regime": "light", "method": "dare", "density": density})
        heavy = cell(p, **{"zoo.regime": "heavy", "method": "dare", "density": density})
        rows.append((f"DARE {density:g}: light - heavy", compare(light, heavy), +1))
    claims.append(("(a) DARE works on light fine-tunes and degrades on heavy ones", rows))
    # (b) DP beats magnitude pruning at high pruning rates
    rows = []
    for regime in regimes:
        for density in (0.1, 0.2):
            dp = cell(p, **{"zoo.regime": regime, "method": "dp", "density": density})
            mag = cell(p, **{"zoo.regime": regime, "method": "magnitude", "density": density})
            rows.append((f"{regime}, density {density:g}: DP - magnitude", compare(dp, mag), +1))
    claims.append(("(b) DP beats magnitude pruning at high pruning rates", rows))
    # (c) DPPA at density 0.2 is comparable to the others at 0.9: not worse by more than the spread
    rows = []
    for regime in regimes:
        dppa = cell(p, **{"zoo.regime": regime, "method": "dppa", "density": 0.2})
        for method in ("magnitude", "dare", "dp"):
            other = cell(p, **{"zoo.regime": regime, "method": method, "density": 0.9})
            comparison = compare(dppa, other)
            # comparable: not worse by more than the spread (which one seed cannot tell)
            if comparison["n"] > 1:
                comparison["sign"] = 1 if comparison["sign"] >= 0 else -1
            rows.append((f"{regime}: DPPA 0.2 - {method} 0.9", comparison, +1))
    claims.append(("(c) DPPA at density 0.2 is comparable to other pruning at 0.9", rows))
    # (d) merging after DPPA improves on merging after other pruning
    rows = []
    pairs = [
        ("DPPA + TIES", "DP + TIES"),
        ("DPPA + TIES", "DARE + TIES"),
        ("DPPA + task arithmetic", "DARE + task arithmetic"),
    ]
    for regime in regimes:
        for ours, other in pairs:
            a = cell(m, **{"zoo.regime": regime, "combination": ours})
            b = cell(m, **{"zoo.regime": regime, "combination": other})
            rows.append((f"{regime}: {ours} - {other}", compare(a, b), +1))
    claims.append(("(d) merging after DPPA improves on merging after other pruning", rows))
    return claims


def summary_tables(pruning: pd.DataFrame, merging: pd.DataFrame, pattern: pd.DataFrame | None = None) -> list[str]:
    """Per regime: each pruning method's mean over fine-tunes by density, and each merge's mean over tasks; cells
    are mean ± std over seeds (n = number of seeds)."""
    frames = [pruning] + ([pattern] if pattern is not None else [])
    p = per_seed(pd.concat(frames, ignore_index=True), PRUNING_KEYS)
    m = per_seed(merging[merging["task"] != "scale"], ["zoo.regime", "combination"])
    scale = merging[merging["task"] == "scale"]
    lines = []
    for regime in sorted(set(p["zoo.regime"]) | set(m["zoo.regime"])):
        mine = p[p["zoo.regime"] == regime]
        densities = sorted(set(mine["density"]))
        lines += ["", f"### {regime}: each fine-tune pruned alone (mean over fine-tunes)", ""]
        lines += ["| method | " + " | ".join(f"{d:g}" for d in densities) + " |", "|---" * (len(densities) + 1) + "|"]
        for method in dict.fromkeys(mine["method"]):
            cells = []
            for d in densities:
                values = list(cell(mine, method=method, density=d).values())
                cells.append(f"{_ms(values)} (n={len(values)})" if values else "-")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        merges = m[m["zoo.regime"] == regime]
        if len(merges):
            lines += ["", f"### {regime}: all fine-tunes merged (mean over tasks), at the searched scale", ""]
            lines += ["| merge | normalised | scales chosen | seeds |", "|---|---|---|---|"]
            for combination in dict.fromkeys(merges["combination"]):
                values = list(cell(merges, combination=combination).values())
                chosen = scale[(scale["zoo.regime"] == regime) & (scale["combination"] == combination)]
                scales = ", ".join(f"{v:g}" for v in chosen.sort_values("seed")["normalised"])
                lines.append(f"| {combination} | {_ms(values)} | {scales} | {len(values)} |")
    return lines


def claims_markdown(pruning: pd.DataFrame, merging: pd.DataFrame, pattern: pd.DataFrame | None = None) -> str:
    lines = [
        "# The paper's claims on the demo zoo",
        "",
        "Cells: normalised score (over the dense fine-tune), mean ± std over seeds; a difference counts when "
        "|mean of the per-seed differences| > their std (experiments/claims.py).",
        *summary_tables(pruning, merging, pattern),
    ]
    for claim, rows in claim_rows(pruning, merging):
        signs = [c["sign"] * expected if c["n"] else 0 for _, c, expected in rows]  # missing: no evidence
        lines += ["", f"## {claim}: **{verdict(signs)}**", "", "| comparison | A | B | A - B | spread | seeds |"]
        lines.append("|---|---|---|---|---|---|")
        for label, c, _ in rows:
            if not c["n"]:
                lines.append(f"| {label} | - | - | - | - | 0 |")
                continue
            spread = "-" if c["spread"] == float("inf") else f"{c['spread']:.3f}"
            lines.append(f"| {label} | {c['a']} | {c['b']} | {c['diff']:+.3f} | {spread} | {c['n']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="experiments/results", help="the grid's tables folder")
    args = parser.parse_args(argv)
    results = Path(args.results)
    try:
        pruning, merging = (pd.read_csv(results / f"{name}.csv") for name in ("pruning", "merging"))
    except (OSError, pd.errors.EmptyDataError) as exc:
        print(f"claims: error: {exc}; run the grid first (make experiment)", file=sys.stderr)
        return 2
    pattern_csv = results / "dppa-pattern.csv"
    pattern = pd.read_csv(pattern_csv) if pattern_csv.exists() and pattern_csv.stat().st_size > 1 else None
    if pattern is not None:  # its DP rows repeat the pruning grid's: keep only the pattern strategy's
        pattern = pattern[pattern["method"].str.startswith("dppa (")]
    text = claims_markdown(pruning, merging, pattern)
    (results / "claims.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
