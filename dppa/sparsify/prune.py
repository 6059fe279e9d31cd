"""Pruning a delta folder with any method of `PRUNERS`. Out-of-scope tensors keep their delta."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from dppa.compute import resolve_device
from dppa.errors import DppaError
from dppa.io.atomic import check_output_free
from dppa.io.manifest import check_is_delta
from dppa.io.reader import open_checkpoint
from dppa.sparsify.registry import PRUNERS
from dppa.sparsify.scope import DEFAULT_SCOPE, compile_scope
from dppa.sparsify.transform import check_density, check_storage, transform_delta


def prune_delta(
    delta: str | os.PathLike,
    out: str | os.PathLike,
    *,
    method: str,
    density: float,
    scope: str = DEFAULT_SCOPE,
    options: Any = None,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    max_shard_size: str = "5GB",
    storage: str = "sparse",
) -> Path:
    """Prune the delta folder `delta` into `out`; returns `out`.

    `options`: the method's options dataclass, a dict of its option values, or None for its defaults.
    """
    entry = PRUNERS.get(method)
    options = PRUNERS.options_for(method, options)
    check_density(density)
    check_storage(storage)
    out = Path(out)
    check_output_free(out, overwrite)
    dev = resolve_device(device)
    reader = open_checkpoint(delta)
    check_is_delta(reader.folder)
    regex = compile_scope(scope, reader)
    if not any(regex.search(n) for n in reader.names()):
        raise DppaError(
            f"{reader.folder}: no tensor matches the pruning scope {scope!r}; pass --scope for this architecture"
        )
    plan = entry.impl(reader, regex, density, options, dev, progress)
    manifest = {
        "kind": "pruned",
        "pruned": True,
        "method": method,
        "density": density,
        **regex.record(),
        **dataclasses.asdict(options),
        **plan.manifest,
    }

    return transform_delta(
        reader,
        out,
        plan.prune,
        scope=regex,
        device=dev,
        manifest=manifest,
        desc=f"prune {method} {Path(delta).name}",
        overwrite=overwrite,
        progress=progress,
        max_shard_size=max_shard_size,
        storage=storage,
        # DP moves a module's density by up to 2 * lamda; DARE's random draw can land a little above its density
        density=min(1.0, density + 2 * getattr(options, "lamda", 0.0) + 0.01),
    )
