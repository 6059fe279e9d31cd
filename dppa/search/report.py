"""What one amplification search did, as it is recorded: the manifest's summary, the trace (search_trace.json and
search_trace.csv, one row per candidate) and the time split between building and evaluating candidates."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from dppa.evaluation.scores import Scores, primary_scores
from dppa.search.core import SearchResult


@dataclass
class CandidateTiming:
    factors: tuple[float, ...]
    build_s: float  # setting the model's weights to the candidate
    evaluate_s: float  # the harness on the candidate


@dataclass
class SearchReport:
    """What one search did: the result, where it went, how many evaluations were real, and the time split."""

    output: Path
    result: SearchResult
    dense_scores: dict[str, float]
    candidate_scores: dict[tuple[float, ...], Scores]
    real_evaluations: int  # harness runs this call made (candidates and the dense fine-tune); 0 on a cached rerun
    cache_hits: int
    setup_s: float  # loading the base, computing the DP bands and loading the tasks, once per search
    timings: list[CandidateTiming] = field(default_factory=list)
    fingerprint: str = ""
    normalised: bool = True  # False when the dense fine-tune scored 0 on a task and the objective is raw

    def build_over_evaluate(self) -> float | None:
        """Total candidate build time / total evaluation time over the candidates evaluated for real."""
        evaluate = sum(t.evaluate_s for t in self.timings)
        return sum(t.build_s for t in self.timings) / evaluate if evaluate > 0 else None

    def summary(self) -> dict:
        """The manifest's record of the search (the full trace lives in search_trace.json)."""
        return {
            "strategy": self.result.strategy,
            "best_factors": list(self.result.best_factors),
            "best_score": self.result.best_score,
            "n_candidates": self.result.n_evals,
            "stop_reason": self.result.stop_reason,
            "dense_scores": self.dense_scores,
            "objective": "normalised geometric mean" if self.normalised else "raw geometric mean",
            "real_evaluations": self.real_evaluations,
            "cache_hits": self.cache_hits,
            "fingerprint": self.fingerprint,
        }

    def trace_rows(self) -> list[dict]:
        """One row per candidate: factors, objective, per-task scores, decision, timing (blank when cached)."""
        timing = {t.factors: t for t in self.timings}
        rows = []
        for row, ev in zip(self.result.trace_rows(), self.result.trace):
            for task, value in primary_scores(self.candidate_scores[ev.factors]).items():
                row[task] = value
            t = timing.get(ev.factors)
            row.update(
                cached=t is None,
                build_s="" if t is None else round(t.build_s, 4),
                evaluate_s="" if t is None else round(t.evaluate_s, 4),
            )
            rows.append(row)
        return rows

    def trace_json(self, settings) -> dict:
        """search_trace.json: the trace, the settings (`SearchSettings.record()`), the summary and the timing."""
        ratio = self.build_over_evaluate()
        return {
            **self.result.to_dict(),
            "settings": settings.record(),
            "summary": self.summary(),
            "candidate_scores": [{"factors": list(f), "scores": s} for f, s in self.candidate_scores.items()],
            "timing": {
                "setup_s": round(self.setup_s, 4),
                "candidates": [
                    {"factors": list(t.factors), "build_s": round(t.build_s, 5), "evaluate_s": round(t.evaluate_s, 4)}
                    for t in self.timings
                ],
                "build_s_total": round(sum(t.build_s for t in self.timings), 5),
                "evaluate_s_total": round(sum(t.evaluate_s for t in self.timings), 4),
                "build_over_evaluate": None if ratio is None else round(ratio, 5),
            },
        }


def rows_to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    fields = list(dict.fromkeys(key for row in rows for key in row))
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
