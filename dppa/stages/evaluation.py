"""Scoring stages (lm-evaluation-harness, cached by content), the report, and publishing the merged model."""

from __future__ import annotations

import json
from pathlib import Path

from dppa.io.atomic import atomic_write_text
from dppa.pipeline.config import BASE_NAME, Params
from dppa.stages.common import clear_leftovers, eval_device, is_unused, retried
from dppa.stages.models import model_folder


def _dump(record: dict) -> str:
    return json.dumps(record, indent=2) + "\n"


def score(
    params: Params,
    root: Path,
    model: str,
    base: Path,
    finetune: Path,
    pruned: Path,
    amplified: Path,
    out: Path,
    cache: Path,
) -> Path:
    """The fine-tune alone, dense, pruned and amplified, on its own tasks (evaluate.split): what pruning cost it."""
    from dppa.evaluation.cache import EvalCache
    from dppa.evaluation.objective import normalised_score
    from dppa.evaluation.scores import primary_scores, score_folder
    from dppa.evaluation.scoring import BaseInMemory

    skipped = params.not_evaluated(model)
    if skipped:
        atomic_write_text(out, _dump({"skipped": skipped}))
        return out
    ev, prune = params.evaluate, params.prune_for(model)
    tasks, where = params.finetune(model).tasks, eval_device(params)
    base_folder, dense_folder = model_folder(base, root), model_folder(finetune, root)
    variants = {"pruned": pruned} if is_unused(amplified) else {"pruned": pruned, "amplified": amplified}

    def folder_scores(folder: Path) -> dict[str, float]:
        found, _cached = score_folder(
            folder, tasks, split=ev.split, limit=ev.limit, batch_size=ev.batch_size, device=where, cache=cache,
            base=base_folder,
        )  # fmt: skip
        return primary_scores(found)

    scores = {"base": folder_scores(base_folder), "dense": folder_scores(dense_folder)}
    in_memory = BaseInMemory(base_folder, where)
    for name, delta in variants.items():
        scores[name] = in_memory.score_delta(
            delta, tasks, split=ev.split, limit=ev.limit, batch_size=ev.batch_size, cache=EvalCache(cache)
        )
    normalised_scores = {name: normalised_score(scores[name], scores["dense"]) for name in ("base", *variants)}
    record = {"method": prune.method, "density": prune.density, "split": ev.split, "limit": ev.limit}
    atomic_write_text(out, _dump({**record, "scores": scores, "normalised": normalised_scores}))
    return out


def evaluate(params: Params, root: Path, fetched: Path, merged: Path, out: Path, cache: Path) -> Path:
    """Scores of the base, every dense fine-tune and the merged model on evaluate.split (unchanged models come
    from the evaluation cache, so a new merge costs one evaluation)."""
    from dppa.evaluation.scores import score_folder

    ev = params.evaluate
    skipped = params.not_evaluated()
    if skipped:
        atomic_write_text(out, _dump({"skipped": skipped, "split": ev.split, "models": {}}))
        return out
    tasks = params.eval_tasks()
    folders = {name: model_folder(fetched / name, root) for name in params.all_models()}
    folders["merged"] = merged
    # One model at a time: evaluations are model-heavy; parallel ones would only compete for the same device.
    results = {}
    for name, folder in folders.items():
        results[name], _cached = score_folder(
            folder, tasks, split=ev.split, limit=ev.limit, batch_size=ev.batch_size, device=eval_device(params),
            cache=cache, base=folders[BASE_NAME],
        )  # fmt: skip
    scores = {
        "split": ev.split,
        "limit": ev.limit,
        "tasks": tasks,
        "finetunes": {n: e.tasks for n, e in params.models.finetunes.items()},
        "merged": {"method": params.merge.method, "inputs": params.merge.inputs},
        "models": results,
    }
    atomic_write_text(out, _dump(scores))
    return out


def report(
    params: Params,
    root: Path,
    scores: Path,
    finetunes: Path,
    traces: Path,
    merge: Path,
    merged: Path,
    out: Path,
    summary: Path,
) -> Path:
    """Tables and plots of every score, the summary metrics, and the merged model's card with its scores."""
    from dppa.evaluation.report import write_report
    from dppa.evaluation.report_notes import pipeline_notes
    from dppa.merging.card import REPORT_CARD, scored_card

    clear_leftovers(out)
    card = scored_card(merged, scores)
    notes = pipeline_notes(finetunes, merge)
    write_report(scores, traces, out, summary, notes=notes, extra_files={REPORT_CARD: card} if card else {})
    return out


def publish(params: Params, root: Path, merged: Path, report: Path, summary: Path, out: Path) -> Path:
    """The merged model to the hub (publish.repo; off when null), gated by its normalised score; the result, commit
    sha included, in `out` (a DVC metric)."""
    from dppa.errors import DppaError
    from dppa.merging.card import REPORT_CARD
    from dppa.pipeline.publish import Gate, publish_model

    settings = params.publish
    if not settings.repo:
        atomic_write_text(out, _dump({"published": False, "reason": "publish.repo is null"}))
        return out
    gate = settings.gate
    score = (json.loads(summary.read_text()).get("merged") or {}).get("normalised")
    card = (report / REPORT_CARD).read_text() if (report / REPORT_CARD).exists() else None
    result = retried(
        lambda: publish_model(
            merged,
            settings.repo,
            revision=settings.revision,
            private=settings.private,
            card=card,
            score=score,
            gate=Gate(min_score=gate.min_score, no_worse=gate.no_worse),
        ),
        f"publish {settings.repo}",
        delays_s=(10, 10),
    )
    atomic_write_text(out, _dump(result.to_dict()))
    line = f"publish {result.repo}@{result.revision}: {result.reason}"
    print(line + (f" (commit {result.commit})" if result.commit else ""))
    if not result.published and result.reason.startswith("refused") and gate.fail_run:
        raise DppaError(line + " (publish.gate.fail_run is true)")
    return out
