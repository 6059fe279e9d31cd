"""Delta arithmetic: extract, prune, amplify (fixed factors or searched), merge. All model-heavy: GPU-tagged."""

from __future__ import annotations

from pathlib import Path

from dppa.tasks import GPU_TAG
from prefect import task


@task(tags=[GPU_TAG])
def extract(base: Path, finetuned: Path, out: Path, dtype: str, device: str) -> Path:
    from dppa.extract import extract_delta

    return extract_delta(base, finetuned, out, dtype=dtype, device=device, overwrite=True, progress=False)


@task(tags=[GPU_TAG])
def prune(delta: Path, out: Path, method: str, density: float, scope: str, options: dict, device: str) -> Path:
    from dppa.sparsify.prune import prune_delta

    return prune_delta(
        delta,
        out,
        method=method,
        density=density,
        scope=scope,
        options=options,
        device=device,
        overwrite=True,
        progress=False,
    )


@task(tags=[GPU_TAG])
def amplify_fixed(
    delta: Path, out: Path, densities: list[float], factors: list[float], dp_options: dict, scope: str, device: str
) -> Path:
    from dppa.sparsify.bands import amplify_delta

    return amplify_delta(
        delta,
        out,
        densities=densities,
        factors=factors,
        options=dp_options,
        scope=scope,
        device=device,
        overwrite=True,
        progress=False,
        extra_manifest={"factors_from": "params.yaml"},
    )


@task(tags=[GPU_TAG])
def amplify_searched(
    base: Path,
    delta: Path,
    reference: Path,
    out: Path,
    *,
    densities: list[float],
    tasks: list[str],
    search: dict,
    dp_options: dict,
    scope: str,
    batch_size: int,
    cache: Path,
    device: str,
) -> Path:
    from dppa.search.runner import search_amplification

    report = search_amplification(
        base,
        delta,
        out,
        tasks=tasks,
        reference=reference,
        densities=densities,
        **search,
        dp_options=dp_options,
        scope=scope,
        batch_size=batch_size,
        cache=cache,
        device=device,
        overwrite=True,
        progress=False,
    )
    return report.output


@task(tags=[GPU_TAG])
def merge(
    base: Path,
    deltas: list[Path],
    out: Path,
    *,
    method: str,
    weights: list[float] | None,
    scale: float,
    density: float | None,
    device: str,
    allow_other_base: bool = False,
) -> Path:
    from dppa.merging.merge import merge_deltas

    return merge_deltas(
        base,
        deltas,
        out,
        method=method,
        weights=weights,
        scale=scale,
        options={"density": density} if method == "ties" else None,
        device=device,
        allow_other_base=allow_other_base,
        overwrite=True,
        progress=False,
    )
