"""Scoring model folders with lm-evaluation-harness (cached by content) and writing the report."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from tasks import GPU_TAG


@task(tags=[GPU_TAG])
def score(model: Path, tasks: list[str], split: str, limit: int | None, batch_size: int, device: str | None,
          cache: Path) -> dict:
    from dppa.evaluation.scores import score_folder

    scores, _cached = score_folder(model, tasks, split=split, limit=limit, batch_size=batch_size, device=device,
                                   cache=cache)
    return scores


@task
def report(scores_json: Path, traces: Path, out: Path, summary_json: Path) -> Path:
    from dppa.evaluation.report import write_report

    write_report(scores_json, traces, out, summary_json)
    return out
