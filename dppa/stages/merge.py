"""The merge stage: every fine-tune's input merged into the base, at a fixed or searched scale."""

from __future__ import annotations

import json
from pathlib import Path

from dppa.io.atomic import atomic_write_text
from dppa.pipeline.config import BASE_NAME, Params
from dppa.stages.common import clear_leftovers, device
from dppa.stages.models import model_folder


def merge(
    params: Params, root: Path, fetched: Path, inputs: Path, out: Path, trace: Path, record: Path, cache: Path
) -> Path:
    """Merge every fine-tune's input (inputs/NAME) into the base (fetched/base); with `merge.scale: search` the
    scale (and with `merge.weights: search` the weights) is chosen first, against the dense fine-tunes
    (fetched/NAME)."""
    from dppa.merging.merge import merge_deltas
    from dppa.search.merge_search import TRACE_HEADER, search_merge
    from dppa.search.report import rows_to_csv

    m = params.merge
    names = list(params.models.finetunes)
    folders = [inputs / n for n in names]
    weights = [m.weights[n] for n in names] if isinstance(m.weights, dict) else None
    base_folder = model_folder(fetched / BASE_NAME, root)
    clear_leftovers(out)
    scale, trace_text, best_score = m.scale, TRACE_HEADER, None
    if scale == "search":
        scale, weights, result, columns = search_merge(
            base_folder,
            folders,
            {n: model_folder(fetched / n, root) for n in names},
            {n: params.finetune(n).tasks for n in names},
            method=m.method,
            weights=weights,
            density=m.density,
            grid=m.search.grid,
            weight_grid=m.search.weight_grid if m.weights == "search" else None,
            split=m.search.split,
            limit=m.search.limit,
            batch_size=params.evaluate.batch_size,
            device=device(params),
            cache=cache,
            work=out.parent / f".{out.name}.scale-search",
            allow_other_base=m.allow_other_base,
        )
        trace_text, best_score = rows_to_csv(result.trace_rows(columns)), result.best_score
    atomic_write_text(trace, trace_text)
    chosen = {
        "scale": scale,
        "weights": dict(zip(names, weights)) if weights else None,
        "searched": m.scale == "search",
        "best_score": best_score,
    }
    atomic_write_text(record, json.dumps(chosen, indent=2) + "\n")
    return merge_deltas(
        base_folder,
        folders,
        out,
        method=m.method,
        weights=weights,
        scale=scale,
        options={"density": m.density} if m.method == "ties" else None,
        device=device(params),
        allow_other_base=m.allow_other_base,
        overwrite=True,
        progress=False,
    )
