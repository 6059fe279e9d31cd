"""One Prefect flow per pipeline stage. `dppa stage NAME [--model M]` (the command each dvc.yaml stage runs) calls
the flow in STAGES; each flow reads the checked params, resolves artifact paths from the layout under data/, and
calls the tasks in `tasks/`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from prefect import flow

from dppa.pipeline.config import BASE_NAME, Layout, Params
from dppa.pipeline.hub import model_folder
from tasks import deltas, evaluation, models

SEARCH_TRACE = "search_trace.csv"


def clear_leftovers(*outs: Path) -> None:
    """Remove what a killed earlier run of this stage left beside its outputs (temporary folders)."""
    for out in outs:
        for leftover in out.parent.glob(f".{out.name}.tmp-*") if out.parent.is_dir() else []:
            shutil.rmtree(leftover, ignore_errors=True)


def _device(params: Params) -> str:
    return params.runtime.device


def _dp_options(params: Params, name: str) -> dict:
    prune = params.prune_for(name)
    return {"lamda": prune.lamda, "layer_mult": prune.layer_mult, "unit_mult": prune.unit_mult, "scope": prune.scope}


@flow(name="stage-zoo")
def zoo_flow(params: Params, root: Path) -> Path:
    layout = Layout(root)
    clear_leftovers(layout.zoo)
    return models.build_zoo(layout.zoo, params.zoo.size, params.zoo.regime, params.zoo.seed)


@flow(name="stage-fetch")
def fetch_flow(params: Params, root: Path, model: str) -> Path:
    layout = Layout(root)
    entry = params.all_models()[model]
    source = entry.resolve(root)
    out = layout.fetched(model)
    clear_leftovers(out)
    if source.kind == "hub":
        return models.fetch_hub(source.ref, entry.revision, out)
    folder = layout.zoo / source.ref if source.kind == "zoo" else Path(source.ref)
    return models.record_model(source.kind, entry.source, folder, out, root)


def _model(layout: Layout, name: str) -> Path:
    return model_folder(layout.fetched(name), layout.root)


@flow(name="stage-extract")
def extract_flow(params: Params, root: Path, model: str) -> Path:
    layout = Layout(root)
    clear_leftovers(layout.delta(model))
    return deltas.extract(_model(layout, BASE_NAME), _model(layout, model), layout.delta(model),
                          params.extract.dtype, _device(params))


@flow(name="stage-prune")
def prune_flow(params: Params, root: Path, model: str) -> Path:
    layout = Layout(root)
    options = params.prune_for(model).model_dump()
    clear_leftovers(layout.pruned(model))
    return deltas.prune(layout.delta(model), layout.pruned(model), options, _device(params))


def _write_trace(layout: Layout, model: str, trace: Path | None) -> None:
    """The search trace as a DVC plot file; fixed factors give a header-only trace (nothing was searched)."""
    out = layout.search_trace(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if trace is not None and trace.exists():
        shutil.copyfile(trace, tmp)
    else:
        tmp.write_text("index,score,best_score\n")
    os.replace(tmp, out)


@flow(name="stage-amplify")
def amplify_flow(params: Params, root: Path, model: str) -> Path:
    layout = Layout(root)
    out = layout.amplified(model)
    clear_leftovers(out)
    if params.merge.inputs != "amplified":
        # The merge does not use amplified deltas: record that instead of spending a search on them.
        from dppa.io.atomic import atomic_dir

        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "UNUSED").write_text(f"merge.inputs is {params.merge.inputs}: no amplification was run\n")
        _write_trace(layout, model, None)
        return out
    densities = params.band_densities(model)
    factors = params.fixed_factors(model)
    if factors is not None:
        result = deltas.amplify_fixed(layout.delta(model), out, densities, factors, _dp_options(params, model),
                                      _device(params))
        _write_trace(layout, model, None)
        return result
    result = deltas.amplify_searched(
        _model(layout, BASE_NAME), layout.delta(model), _model(layout, model), out, densities=densities,
        tasks=params.finetune(model).tasks, search=params.amplify.search.model_dump(),
        dp_options=_dp_options(params, model), batch_size=params.evaluate.batch_size, cache=layout.eval_cache,
        device=_device(params))
    _write_trace(layout, model, out / SEARCH_TRACE)
    return result


MERGE_INPUTS = {"amplified": Layout.amplified, "pruned": Layout.pruned, "delta": Layout.delta}


@flow(name="stage-merge")
def merge_flow(params: Params, root: Path) -> Path:
    layout = Layout(root)
    names = list(params.models.finetunes)
    inputs = [MERGE_INPUTS[params.merge.inputs](layout, n) for n in names]
    weights = [params.merge.weights[n] for n in names] if params.merge.weights else None
    clear_leftovers(layout.merged)
    return deltas.merge(_model(layout, BASE_NAME), inputs, layout.merged, method=params.merge.method,
                        weights=weights, scale=params.merge.scale, density=params.merge.density,
                        device=_device(params))


@flow(name="stage-evaluate")
def evaluate_flow(params: Params, root: Path) -> Path:
    """Test-split scores of the base, every dense fine-tune and the merged model (unchanged models come from the
    evaluation cache, so a new merge costs one evaluation)."""
    layout = Layout(root)
    ev = params.evaluate
    tasks = params.eval_tasks()
    device = None if params.runtime.device == "auto" else params.runtime.device
    merged_name = f"merged ({params.merge.inputs}, {params.merge.method})"
    folders = {name: _model(layout, name) for name in params.all_models()}
    folders[merged_name] = layout.merged
    # One model at a time: evaluations are model-heavy; parallel ones would only compete for the same device.
    results = {name: evaluation.score(folder, tasks, ev.split, ev.limit, ev.batch_size, device, layout.eval_cache)
               for name, folder in folders.items()}
    scores = {"split": ev.split, "limit": ev.limit, "tasks": tasks,
              "finetunes": {n: e.tasks for n, e in params.models.finetunes.items()},
              "models": results}
    layout.scores.parent.mkdir(parents=True, exist_ok=True)
    tmp = layout.scores.with_name(f".{layout.scores.name}.tmp")
    tmp.write_text(json.dumps(scores, indent=2) + "\n")
    os.replace(tmp, layout.scores)
    return layout.scores


@flow(name="stage-report")
def report_flow(params: Params, root: Path) -> Path:
    layout = Layout(root)
    clear_leftovers(layout.report)
    return evaluation.report(layout.scores, layout.search_trace("x").parent, layout.report, layout.summary)


STAGES = {
    "zoo": zoo_flow,
    "fetch": fetch_flow,
    "extract": extract_flow,
    "prune": prune_flow,
    "amplify": amplify_flow,
    "merge": merge_flow,
    "evaluate": evaluate_flow,
    "report": report_flow,
}
PER_MODEL = {"fetch", "extract", "prune", "amplify"}
