"""Scoring with lm-evaluation-harness (cached by content), the merge-scale search, and the report."""

from __future__ import annotations

from pathlib import Path

from dppa.tasks import GPU_TAG
from prefect import task


@task(tags=[GPU_TAG])
def score(
    model: Path,
    tasks: list[str],
    split: str,
    limit: int | None,
    batch_size: int,
    device: str | None,
    cache: Path,
    base: Path | None = None,
) -> dict:
    """A model folder's scores; `base`: the base model, for a LoRA adapter folder."""
    from dppa.evaluation.scores import score_folder

    scores, _cached = score_folder(
        model, tasks, split=split, limit=limit, batch_size=batch_size, device=device, cache=cache, base=base
    )
    return scores


@task(tags=[GPU_TAG])
def score_finetune(
    base: Path,
    finetune: Path,
    variants: dict[str, Path],
    tasks: list[str],
    split: str,
    limit: int | None,
    batch_size: int,
    device: str | None,
    cache: Path,
) -> dict:
    """{"scores": {base, dense, VARIANT: {task: score}}, "normalised": {VARIANT: score / dense}}; each variant
    is a delta folder scored as base + delta in memory."""
    from dppa.evaluation.cache import EvalCache
    from dppa.evaluation.scores import primary_scores, score_folder
    from dppa.pipeline.scoring import BaseInMemory, normalised

    def folder_scores(folder: Path) -> dict[str, float]:
        return primary_scores(
            score_folder(
                folder, tasks, split=split, limit=limit, batch_size=batch_size, device=device, cache=cache, base=base
            )[0]
        )

    scores = {"base": folder_scores(base), "dense": folder_scores(finetune)}
    model = BaseInMemory(base, device)
    for name, delta in variants.items():
        scores[name] = model.score_delta(
            delta, tasks, split=split, limit=limit, batch_size=batch_size, cache=EvalCache(cache)
        )
    return {
        "scores": scores,
        "normalised": {name: normalised(scores[name], scores["dense"]) for name in ("base", *variants)},
    }


@task(tags=[GPU_TAG])
def search_merge(
    base: Path, inputs: list[Path], dense: dict[str, Path], tasks: dict[str, list[str]], **settings
) -> tuple[float, list[float] | None, list[dict]]:
    from dppa.pipeline.scoring import search_merge as search

    return search(base, inputs, dense, tasks, **settings)


@task
def report(
    scores_json: Path, finetunes: Path, traces: Path, merge_json: Path, merged: Path, out: Path, summary_json: Path
) -> Path:
    """The report; its model_card.md is the merged model's card with the evaluation's scores (what publish uploads)."""
    from dppa.evaluation.report import write_report
    from dppa.merging.card import REPORT_CARD, scored_card
    from dppa.pipeline.scoring import pipeline_notes

    card = scored_card(merged, scores_json)
    notes = pipeline_notes(finetunes, merge_json)
    write_report(scores_json, traces, out, summary_json, notes=notes, extra_files={REPORT_CARD: card} if card else {})
    return out


@task(retries=2, retry_delay_seconds=10)
def publish(merged: Path, report: Path, summary_json: Path, out: Path, settings: dict) -> Path:
    """Upload the merged model with the report's card (scores included) unless publish.repo is null or the gate
    refuses it; a refusal is one line in `out` (and fails the run only with gate.fail_run)."""
    import json

    from dppa.errors import DppaError
    from dppa.io.atomic import atomic_write_text
    from dppa.merging.card import REPORT_CARD
    from dppa.pipeline.publish import Gate, publish_model

    if not settings.get("repo"):
        atomic_write_text(out, json.dumps({"published": False, "reason": "publish.repo is null"}, indent=2) + "\n")
        return out
    gate = settings["gate"]
    summary = json.loads(Path(summary_json).read_text())
    score = (summary.get("merged") or {}).get("normalised_mean")
    card = (Path(report) / REPORT_CARD).read_text() if (Path(report) / REPORT_CARD).exists() else None
    result = publish_model(
        merged,
        settings["repo"],
        revision=settings["revision"],
        private=settings["private"],
        card=card,
        score=score,
        gate=Gate(min_score=gate["min_score"], no_worse=gate["no_worse"]),
    )
    atomic_write_text(out, json.dumps(result.to_dict(), indent=2) + "\n")
    line = f"publish {result.repo}@{result.revision}: {result.reason}"
    print(line + (f" (commit {result.commit})" if result.commit else ""))
    if not result.published and result.reason.startswith("refused") and gate["fail_run"]:
        raise DppaError(line + " (publish.gate.fail_run is true)")
    return out
