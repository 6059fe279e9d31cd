"""Delta arithmetic stages: extract, prune, amplify (fixed factors or searched on the validation split)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dppa.io.atomic import atomic_write_text
from dppa.pipeline.config import Params
from dppa.stages.common import SEARCH_TRACE, clear_leftovers, device, dp_options, write_unused
from dppa.stages.models import model_folder

EMPTY_TRACE = "index,score,best_score\n"


def extract(params: Params, root: Path, model: str, base: Path, finetune: Path, out: Path) -> Path:
    """delta = fine-tune - base (extract.dtype)."""
    from dppa.extract import extract_delta

    clear_leftovers(out)
    return extract_delta(
        model_folder(base, root),
        model_folder(finetune, root),
        out,
        dtype=params.extract.dtype,
        device=device(params),
        overwrite=True,
        progress=False,
    )


def prune(params: Params, root: Path, model: str, delta: Path, out: Path) -> Path:
    """The delta pruned by prune.method at its density (with the fine-tune's overrides)."""
    from dppa.sparsify.prune import prune_delta

    clear_leftovers(out)
    settings = params.prune_for(model)
    return prune_delta(
        delta,
        out,
        method=settings.method,
        density=settings.density,
        scope=settings.scope,
        options=dataclasses.asdict(settings.options()),
        device=device(params),
        overwrite=True,
        progress=False,
    )


def amplify(
    params: Params,
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
        atomic_write_text(trace, EMPTY_TRACE)
        return write_unused(out, f"merge.inputs is {params.merge.inputs}: no amplification was run")
    densities = params.band_densities(model)
    factors = params.fixed_factors(model)
    scope = params.prune_for(model).scope
    if factors is not None:
        from dppa.sparsify.bands import amplify_delta

        atomic_write_text(trace, EMPTY_TRACE)  # nothing was searched
        return amplify_delta(
            delta,
            out,
            densities=densities,
            factors=factors,
            options=dp_options(params, model),
            scope=scope,
            device=device(params),
            overwrite=True,
            progress=False,
            extra_manifest={"factors_from": "params.yaml"},
        )
    from dppa.search.runner import search_amplification

    report = search_amplification(
        model_folder(base, root),
        delta,
        out,
        tasks=params.finetune(model).tasks,
        dense=model_folder(finetune, root),
        densities=densities,
        **params.amplify.search.model_dump(),
        dp_options=dp_options(params, model),
        scope=scope,
        batch_size=params.evaluate.batch_size,
        cache=cache,
        device=device(params),
        overwrite=True,
        progress=False,
    )
    atomic_write_text(trace, (out / SEARCH_TRACE).read_text())
    return report.output
