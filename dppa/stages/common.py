"""What every stage shares: placeholders for outputs a params file does not use, leftovers of killed runs, and
retries of what the network may fix."""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from dppa.pipeline.config import Params

UNUSED = "UNUSED"
SEARCH_TRACE = "search_trace.csv"
RETRY_DELAYS_S = (10, 60, 180)  # a hub download or API call: three more tries, further apart each time

T = TypeVar("T")


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


def is_unused(out: Path) -> bool:
    return (out / UNUSED).exists()


def may_recover(error: BaseException) -> bool:
    """Whether a later attempt may fix it: the network, a hub error 5xx, a broken download; not the hub's no
    (unknown repository or revision, refused token, pickles only) nor a models-store file that does not match its
    record: those fail at once, with their message."""
    from dppa.errors import DppaError
    from dppa.pipeline.hub import HubRefusal
    from dppa.pipeline.models_store import StoreMismatch

    return isinstance(error, (DppaError, OSError)) and not isinstance(error, (HubRefusal, StoreMismatch))


def retried(call: Callable[[], T], what: str, delays_s: tuple[float, ...] = RETRY_DELAYS_S) -> T:
    """call(), tried again after each of `delays_s` while its error `may_recover`; the last error is raised."""
    for delay in (*delays_s, None):
        try:
            return call()
        except Exception as error:
            if delay is None or not may_recover(error):
                raise
            print(f"{what}: {error} (trying again in {delay:g} s)", file=sys.stderr, flush=True)
            time.sleep(delay)
    raise AssertionError("unreachable")


def dp_options(params: Params, name: str) -> dict:
    """The DP options of this fine-tune's pruning settings (DPA's band edges are DP selections)."""
    from dppa.sparsify.registry import PRUNERS

    return dataclasses.asdict(PRUNERS.make_options("dp", params.prune_for(name).model_dump()))


def device(params: Params) -> str:
    return params.runtime.device


def eval_device(params: Params) -> str | None:
    return None if params.runtime.device == "auto" else params.runtime.device
