"""One Prefect flow per pipeline stage. `dppa stage NAME --arg VALUE ...` (the command each dvc.yaml stage runs)
calls the flow in STAGES with the checked params and the paths dvc.yaml passes: the paths are written in dvc.yaml
only, and each flow's signature is its command line (dppa/cli/stage.py builds the options from it).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from dppa.tasks import deltas, evaluation, models
from prefect import flow

from dppa.io.atomic import atomic_write_text
from dppa.pipeline.config import BASE_NAME, ParamsBase
from dppa.pipeline.scoring import trace_csv

SEARCH_TRACE = "search_trace.csv"
UNUSED = "UNUSED"


def clear_leftovers(*outs: Path) -> None:
    """Remove what a killed earlier run of this stage left beside its outputs (temporary folders)."""
    for out in outs:
        for leftover in out.parent.glob(f".{out.name}.tmp-*") if out.parent.is_dir() else []:
            shutil.rmtree(leftover, ignore_errors=True)


def write_unused(out: Path, why: str) -> Path:
    """An explicit placeholder output, so the stage graph is the same for every params file."""
    from dppa.io.atomic import atomic_dir

    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / UNUSED).write_text(why + "\n")
    return out


def dp_options(params: ParamsBase, name: str) -> dict:
    """The DP options of this fine-tune's pruning settings (DPA's band edges are DP selections)."""
    from dppa.sparsify.registry import PRUNERS

    return dataclasses.asdict(PRUNERS.make_options("dp", params.prune_for(name).model_dump()))


def _device(params: ParamsBase) -> str:
    return params.runtime.device


def _eval_device(params: ParamsBase) -> str | None:
    return None if params.runtime.device == "auto" else params.runtime.device


@flow(name="stage-zoo")
def zoo_flow(params: ParamsBase, root: Path, out: Path) -> Path:
    """The demo models (zoo.size, zoo.regime, zoo.seed)."""
    clear_leftovers(out)
    return models.build_zoo(out, params.zoo.size, params.zoo.regime, params.zoo.seed)


@flow(name="stage-fetch")
def fetch_flow(params: ParamsBase, root: Path, model: str, zoo: Path, out: Path) -> Path:
    """A hub snapshot, or the record of a zoo or local model folder (MODEL may be base)."""
    entry = params.all_models()[model]
    source = entry.resolve(root)
    clear_leftovers(out)
    if source.kind == "hub":
        return models.fetch_hub(source.ref, entry.revision, out)
    folder = zoo / source.ref if source.kind == "zoo" else Path(source.ref)
    return models.record_model(source.kind, entry.source, folder, out, root)


@flow(name="stage-extract")
def extract_flow(params: ParamsBase, root: Path, model: str, base: Path, finetune: Path, out: Path) -> Path:
    """delta = fine-tune - base (extract.dtype)."""
    clear_leftovers(out)
    return deltas.extract(
        models.model_folder(base, root), models.model_folder(finetune, root), out, params.extract.dtype, _device(params)
    )


@flow(name="stage-prune")
def prune_flow(params: ParamsBase, root: Path, model: str, delta: Path, out: Path) -> Path:
    """The delta pruned by prune.method at its density (with the fine-tune's overrides)."""
    clear_leftovers(out)
    prune = params.prune_for(model)
    options = dataclasses.asdict(prune.options())
    return deltas.prune(delta, out, prune.method, prune.density, prune.scope, options, _device(params))


@flow(name="stage-amplify")
def amplify_flow(
    params: ParamsBase,
    root: Path,
    model: str,
    base: Path,
    finetune: Path,
    delta: Path,
    out: Path,
    trace: Path,
    cache: Path,
) -> Path:
    """DP bands x factors, fixed or searched on the validation split; the search trace as a DVC plot."""
    clear_leftovers(out)
    if params.merge.inputs != "amplified":
        # The merge does not use amplified deltas: record that instead of spending a search on them.
        atomic_write_text(trace, "index,score,best_score\n")
        return write_unused(out, f"merge.inputs is {params.merge.inputs}: no amplification was run")
    densities = params.band_densities(model)
    factors = params.fixed_factors(model)
    if factors is not None:
        atomic_write_text(trace, "index,score,best_score\n")  # nothing was searched
        return deltas.amplify_fixed(
            delta, out, densities, factors, dp_options(params, model), params.prune_for(model).scope, _device(params)
        )
    result = deltas.amplify_searched(
        models.model_folder(base, root),
        delta,
        models.model_folder(finetune, root),
        out,
        densities=densities,
        tasks=params.finetune(model).tasks,
        search=params.amplify.search.model_dump(),
        dp_options=dp_options(params, model),
        scope=params.prune_for(model).scope,
        batch_size=params.evaluate.batch_size,
        cache=cache,
        device=_device(params),
    )
    atomic_write_text(trace, (out / SEARCH_TRACE).read_text())
    return result


@flow(name="stage-score")
def score_flow(
    params: ParamsBase,
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
    skipped = params.not_evaluated(model)
    if skipped:
        atomic_write_text(out, json.dumps({"skipped": skipped}, indent=2) + "\n")
        return out
    ev = params.evaluate
    prune = params.prune_for(model)
    variants = {"pruned": pruned}
    if not (amplified / UNUSED).exists():
        variants["amplified"] = amplified
    scores = evaluation.score_finetune(
        models.model_folder(base, root),
        models.model_folder(finetune, root),
        variants,
        params.finetune(model).tasks,
        ev.split,
        ev.limit,
        ev.batch_size,
        _eval_device(params),
        cache,
    )
    record = {"method": prune.method, "density": prune.density, "split": ev.split, "limit": ev.limit, **scores}
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    return out


@flow(name="stage-merge")
def merge_flow(
    params: ParamsBase, root: Path, fetched: Path, inputs: Path, out: Path, trace: Path, record: Path, cache: Path
) -> Path:
    """Merge every fine-tune's input (inputs/NAME) into the base (fetched/base); with `merge.scale: search` the
    scale (and with `merge.weights: search` the weights) is chosen first, against the dense fine-tunes
    (fetched/NAME)."""
    m = params.merge
    names = list(params.models.finetunes)
    folders = [inputs / n for n in names]
    weights = [m.weights[n] for n in names] if isinstance(m.weights, dict) else None
    base_folder = models.model_folder(fetched / BASE_NAME, root)
    clear_leftovers(out)
    scale, rows = m.scale, []
    if scale == "search":
        dense = {n: models.model_folder(fetched / n, root) for n in names}
        tasks = {n: params.finetune(n).tasks for n in names}
        scale, weights, rows = evaluation.search_merge(
            base_folder,
            folders,
            dense,
            tasks,
            method=m.method,
            weights=weights,
            density=m.density,
            grid=m.search.grid,
            weight_grid=m.search.weight_grid if m.weights == "search" else None,
            split=m.search.split,
            limit=m.search.limit,
            batch_size=params.evaluate.batch_size,
            device=_device(params),
            cache=cache,
            work=out.parent / f".{out.name}.scale-search",
            allow_other_base=m.allow_other_base,
        )
    atomic_write_text(trace, trace_csv(rows))
    atomic_write_text(
        record,
        json.dumps(
            {
                "scale": scale,
                "weights": dict(zip(names, weights)) if weights else None,
                "searched": m.scale == "search",
                "best_score": max((r["score"] for r in rows), default=None),
            },
            indent=2,
        )
        + "\n",
    )
    return deltas.merge(
        base_folder,
        folders,
        out,
        method=m.method,
        weights=weights,
        scale=scale,
        density=m.density,
        device=_device(params),
        allow_other_base=m.allow_other_base,
    )


@flow(name="stage-evaluate")
def evaluate_flow(params: ParamsBase, root: Path, fetched: Path, merged: Path, out: Path, cache: Path) -> Path:
    """Scores of the base, every dense fine-tune and the merged model on evaluate.split (unchanged models come
    from the evaluation cache, so a new merge costs one evaluation)."""
    ev = params.evaluate
    skipped = params.not_evaluated()
    if skipped:
        atomic_write_text(out, json.dumps({"skipped": skipped, "split": ev.split, "models": {}}, indent=2) + "\n")
        return out
    tasks = params.eval_tasks()
    folders = {name: models.model_folder(fetched / name, root) for name in params.all_models()}
    folders["merged"] = merged
    # One model at a time: evaluations are model-heavy; parallel ones would only compete for the same device.
    results = {
        name: evaluation.score(
            folder, tasks, ev.split, ev.limit, ev.batch_size, _eval_device(params), cache, base=folders[BASE_NAME]
        )
        for name, folder in folders.items()
    }
    scores = {
        "split": ev.split,
        "limit": ev.limit,
        "tasks": tasks,
        "finetunes": {n: e.tasks for n, e in params.models.finetunes.items()},
        "merged": {"method": params.merge.method, "inputs": params.merge.inputs},
        "models": results,
    }
    atomic_write_text(out, json.dumps(scores, indent=2) + "\n")
    return out


@flow(name="stage-report")
def report_flow(
    params: ParamsBase,
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
    clear_leftovers(out)
    return evaluation.report(scores, finetunes, traces, merge, merged, out, summary)


@flow(name="stage-publish")
def publish_flow(params: ParamsBase, root: Path, merged: Path, report: Path, summary: Path, out: Path) -> Path:
    """The merged model to the hub (publish.repo; off when null), gated by its normalised score; the result, commit
    sha included, in `out` (a DVC metric)."""
    return evaluation.publish(merged, report, summary, out, params.publish.model_dump())


STAGES = {
    "zoo": zoo_flow,
    "fetch": fetch_flow,
    "extract": extract_flow,
    "prune": prune_flow,
    "amplify": amplify_flow,
    "score": score_flow,
    "merge": merge_flow,
    "evaluate": evaluate_flow,
    "report": report_flow,
    "publish": publish_flow,
}
