"""A persistent cache of evaluation scores, so a resumed or repeated search evaluates nothing twice.

A score is keyed by everything that determines it: the content hashes of the model or deltas the candidate is built
from, the base model's hash, the factors (rounded), the tasks, the version of the tasks' data, the split, the example
limit, the harness version, the dtype the forward passes compute in (dppa.evaluation.harness.compute_dtype: float32
on CPU, the checkpoint's own elsewhere), and a ``recipe`` of any other input that changes the candidate or the score
(band densities, DP parameters, dtype, ...). Things that do not change a score (batch size, worker count) stay out
of it. ``eval_key`` is the one place such a key is built, so no caller can leave a part out.

Storage is one JSON-lines file: one record per line, appended under an exclusive ``flock`` and fsynced, so several
processes or threads may write at once and a crash can at worst leave a truncated last line, which readers skip
and the next writer terminates before appending. Readers pick up other writers' records on a miss.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from dppa.evaluation.task_sources import task_data_versions

FACTOR_DECIMALS = 6


def harness_version() -> str:
    """The evaluation harness and its version, part of every key: a new harness may score differently."""
    try:
        return f"lm-eval {version('lm_eval')}"
    except PackageNotFoundError:
        return "lm-eval (not installed)"


def _canonical(value: Any) -> str:
    # NaN is allowed because harnesses report it (e.g. a stderr over one example); Python's json reads it back.
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _round_factor(value: float) -> float:
    # "+ 0.0" turns -0.0 into 0.0 so both give the same key.
    return round(float(value), FACTOR_DECIMALS) + 0.0


@dataclass(frozen=True)
class EvalKey:
    """Everything that determines one evaluation's scores; build it with ``eval_key``."""

    model: tuple[str, ...]  # content hashes of the model folder, or of the deltas a candidate is built from
    base: str  # the base model's content hash ("" for a whole model folder)
    factors: tuple[float, ...]
    tasks: tuple[str, ...]
    task_data: str  # canonical JSON of the tasks' data versions
    split: str
    limit: int | None
    harness: str
    compute: str  # what the forward passes compute in: "float32", or "saved" (the checkpoint's dtype)
    recipe: str = "{}"  # canonical JSON of the remaining score-determining inputs

    def to_dict(self) -> dict:
        return {
            "model": list(self.model),
            "base": self.base,
            "factors": list(self.factors),
            "tasks": list(self.tasks),
            "task_data": json.loads(self.task_data),
            "split": self.split,
            "limit": self.limit,
            "harness": self.harness,
            "compute": self.compute,
            "recipe": json.loads(self.recipe),
        }

    def digest(self) -> str:
        return hashlib.sha256(_canonical(self.to_dict()).encode()).hexdigest()


def eval_key(
    *,
    model: str | Sequence[str],
    tasks: Sequence[str],
    split: str,
    limit: int | None,
    recipe: Mapping[str, Any],
    compute: str,
    base: str = "",
    factors: Sequence[float] = (),
    harness: str | None = None,
    task_data: Mapping[str, Any] | None = None,
) -> EvalKey:
    """The cache key of one evaluation. ``model``: the content hash of a model folder, or the hashes of the deltas a
    candidate is built from (with ``base`` and ``factors``); ``recipe``: how the candidate is made and loaded
    (e.g. {"candidate": "model-folder", "dtype": "float32"}); ``compute``: ``compute_dtype`` of the device the model
    is evaluated on. ``harness`` and ``task_data`` default to the installed harness's version and the tasks' data
    versions; they are parameters only so that a test can vary them."""
    return EvalKey(
        model=(model,) if isinstance(model, str) else tuple(model),
        base=base,
        factors=tuple(_round_factor(f) for f in factors),
        tasks=tuple(sorted(tasks)),
        task_data=_canonical(dict(task_data_versions(tasks) if task_data is None else task_data)),
        split=split,
        limit=limit,
        harness=harness_version() if harness is None else harness,
        compute=compute,
        recipe=_canonical(dict(recipe)),
    )


class EvalCache:
    """Scores by key in an append-only JSON-lines file; safe for concurrent writers and crashes mid-write."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.skipped_lines = 0  # unreadable lines seen (a crash's truncated write); reported, never fatal
        self._values: dict[str, Any] = {}
        self._offset = 0
        self._lock = threading.Lock()
        self._refresh()

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: EvalKey) -> Any | None:
        """The stored value for ``key``, or None; on a miss, first reads what other writers appended meanwhile."""
        digest = key.digest()
        if digest not in self._values:
            self._refresh()
        return self._values.get(digest)

    def put(self, key: EvalKey, value: Any) -> None:
        """Append ``value`` (any JSON value but None) for ``key``, durably; a later put of the same key wins."""
        if value is None:
            raise ValueError("the cache cannot store None: it means a miss")
        digest = key.digest()
        line = _canonical({"key": digest, "fields": key.to_dict(), "value": value}).encode() + b"\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                handle.write(_terminator_needed(handle) + line)
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        with self._lock:
            # Keep what a reader of the file would get (lists, not tuples), so a hit looks the same in every process.
            self._values[digest] = json.loads(line)["value"]

    def _refresh(self) -> None:
        """Read complete lines appended since the last read; a line still being written is left for next time."""
        if not self.path.exists():
            return
        with self._lock:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
            end = chunk.rfind(b"\n") + 1
            for raw in chunk[:end].splitlines():
                self._take(raw)
            self._offset += end

    def _take(self, raw: bytes) -> None:
        try:
            record = json.loads(raw)
            self._values[record["key"]] = record["value"]
        except (ValueError, KeyError, TypeError):
            self.skipped_lines += 1


def _terminator_needed(handle) -> bytes:
    """A newline if the file's last byte is not one (a writer crashed mid-line), so records never run together."""
    size = handle.seek(0, os.SEEK_END)
    if size == 0:
        return b""
    handle.seek(size - 1)
    return b"" if handle.read(1) == b"\n" else b"\n"


class CachedEvaluator:
    """Wraps ``evaluate(factors) -> value`` so each key is evaluated once, ever; counts real evaluations.

    ``key(factors) -> EvalKey`` gives each candidate's key, e.g. ``functools.partial(eval_key, model=..., ...)``."""

    def __init__(self, evaluate: Callable[[tuple[float, ...]], Any], cache: EvalCache, key: Callable[..., EvalKey]):
        self.evaluate = evaluate
        self.cache = cache
        self.key = key
        self.real_evaluations = 0
        self.hits = 0

    def __call__(self, factors: Sequence[float]) -> Any:
        key = self.key(factors=tuple(factors))
        value = self.cache.get(key)
        if value is not None:
            self.hits += 1
            return value
        value = self.evaluate(tuple(factors))
        self.real_evaluations += 1
        self.cache.put(key, value)
        return value
