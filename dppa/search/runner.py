"""The amplification search of one fine-tune, end to end: DP bands -> factor search on validation -> amplified delta.

The base model is loaded once; each candidate (base + amplified delta for some factors) is set in place by
``dppa.evaluation.weights.CandidateWeights`` and scored by one ``dppa.evaluation.harness.Evaluator`` (the harness's
model wrapper and tasks built once), so no model is written and nothing but the evaluation loop runs per step.
The objective is the normalised score of dppa.evaluation.objective (docs/method.md): the geometric mean over the
fine-tune's tasks of candidate score / dense fine-tune score, both on the validation split (the test split is kept
for final numbers and refused here).

Every score, the dense fine-tune's included, goes through the persistent evaluation cache keyed by what determines
it (``dppa.evaluation.cache.eval_key``), so a repeated or resumed search evaluates nothing twice. The result is the
amplified delta written by ``dppa.sparsify.bands.amplify_delta`` with the chosen factors and the search summary in
its manifest, plus the trace (``search_trace.json`` with timings, ``search_trace.csv`` for a DVC plot) inside it and
optionally elsewhere.

``search_amplification`` is the plain-function entry point (the CLI and the pipeline's amplify stage call it).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dppa.compute import resolve_device
from dppa.errors import DppaError
from dppa.evaluation import objective as scoring
from dppa.evaluation.cache import CachedEvaluator, EvalCache, eval_key
from dppa.evaluation.scores import Scores, primary_scores, recorded_hash, score_folder
from dppa.io.adapter import is_adapter
from dppa.io.atomic import atomic_dir, atomic_write_text, check_output_free
from dppa.io.manifest import read_manifest
from dppa.search.core import SearchResult
from dppa.search.registry import STRATEGIES, canonical
from dppa.search.report import CandidateTiming, SearchReport, rows_to_csv
from dppa.sparsify.registry import PRUNERS
from dppa.sparsify.scope import DEFAULT_SCOPE

TRACE_JSON = "search_trace.json"
TRACE_CSV = "search_trace.csv"
CACHE_ENV = "DPPA_EVAL_CACHE"


def default_cache_path() -> Path:
    """Where scores are cached unless told otherwise: $DPPA_EVAL_CACHE, else ~/.cache/dppa/evalcache.jsonl.

    One file serves every search safely: a key holds everything that determines a score.
    """
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dppa" / "evalcache.jsonl")


def strategy_options(strategy: str, values: Any = None) -> Any:
    """The strategy's options dataclass from ``values``: an instance, or a mapping by field name (None = default);
    an option the strategy does not have is an error unless another strategy has it (shared CLI flags)."""
    entry = STRATEGIES.get(canonical(strategy))
    if isinstance(values, entry.options):
        return values
    values = {k: v for k, v in dict(values or {}).items() if v is not None}
    unknown = set(values) - set(STRATEGIES.option_fields())
    if unknown:
        raise DppaError(
            f"search option(s) {', '.join(sorted(unknown))}: unknown; the {entry.name} strategy takes "
            f"{', '.join(f.name for f in dataclasses.fields(entry.options))}"
        )
    options = STRATEGIES.make_options(entry.name, values)
    if options.budget < 1:
        raise DppaError(f"--budget {options.budget}: must allow at least one evaluation")
    return options


@dataclass(frozen=True, kw_only=True)
class SearchSettings:
    """What the search is asked for; everything here but ``batch_size`` can change its result.

    ``options`` is the strategy's options dataclass (``STRATEGIES.get(strategy).options``), or a mapping of its
    fields; ``strategy`` may be an alias (``reference``)."""

    tasks: tuple[str, ...]
    strategy: str = "coordinate"
    options: Any = None
    densities: tuple[float, ...] = (0.1, 0.2)
    split: str = "validation"
    limit: int | None = None
    combine: str = "max"
    dp: Any = None  # DP's options for the bands: DPOptions, a mapping of its fields, or None for the defaults
    scope: str = DEFAULT_SCOPE
    batch_size: int = 32

    def __post_init__(self):
        object.__setattr__(self, "strategy", STRATEGIES.get(canonical(self.strategy)).name)
        object.__setattr__(self, "options", strategy_options(self.strategy, self.options))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "densities", tuple(float(d) for d in self.densities))
        object.__setattr__(self, "dp", PRUNERS.options_for("dp", self.dp))
        if not self.tasks:
            raise DppaError("--tasks is empty; name the fine-tune's own tasks, e.g. --tasks zoo_arith")
        if self.split == "test":
            raise DppaError(
                "--split test: the factors are tuned on the validation split; the test split is kept "
                "for the final numbers (use --split validation)"
            )

    def run(self, objective: Callable[[tuple[float, ...]], float]) -> SearchResult:
        """The strategy on ``objective``, one factor per band."""
        return STRATEGIES.get(self.strategy).impl(objective, len(self.densities), self.options)

    def candidate_recipe(self) -> dict:
        """The cache key's recipe for a candidate: whatever besides factors, deltas and base shapes its weights."""
        return {
            "candidate": "dppa-bands",
            "densities": list(self.densities),
            "combine": self.combine,
            **dataclasses.asdict(self.dp),
            "scope": self.scope,
            "dtype": "saved",
        }

    def record(self) -> dict:
        """The settings as JSON (the trace's record of what was asked)."""
        return {
            "tasks": list(self.tasks),
            "strategy": self.strategy,
            "options": dataclasses.asdict(self.options),
            "densities": list(self.densities),
            "split": self.split,
            "limit": self.limit,
            "combine": self.combine,
            **dataclasses.asdict(self.dp),
            "scope": self.scope,
        }

    def fingerprint(self, delta_hash: str, base_hash: str, dense_hash: str) -> str:
        """Identifies a search's result: same fingerprint, same factors (given the same harness and data)."""
        body = json.dumps(
            {
                "delta": delta_hash,
                "base": base_hash,
                "dense": dense_hash,
                **{k: v for k, v in self.record().items() if k != "tasks"},
                "tasks": sorted(self.tasks),
            },
            sort_keys=True,
        )
        return hashlib.sha256(body.encode()).hexdigest()


def read_dense_scores(path: Path, tasks: Sequence[str]) -> Scores:
    """Dense fine-tune scores from a JSON file, {task: {metric: value}} (as `dppa eval --output` writes) or
    {task: value}."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DppaError(
            f"{path}: cannot read the dense fine-tune's scores ({exc}); give the dense fine-tune's folder or a "
            "metrics JSON from `dppa eval --output`"
        ) from None
    scores = {t: (v if isinstance(v, dict) else {"score": float(v)}) for t, v in data.items() if t in tasks}
    missing = [t for t in tasks if t not in scores]
    if missing:
        raise DppaError(f"{path}: no dense fine-tune score for task(s) {', '.join(missing)}")
    return scores


def informative_tasks(dense: dict[str, float], log: Callable[[str], None]) -> bool:
    """Whether the objective is normalised (dppa.evaluation.objective's zero rule): tasks the dense fine-tune
    scores 0 on are left out, with a warning; when that leaves none, candidates are ranked by their raw scores."""
    zero = [task for task, value in dense.items() if not value > 0]
    if zero:
        left = "the objective is the raw geometric mean" if len(zero) == len(dense) else "they are left out"
        log(
            f"warning: the dense fine-tune scores 0 on {', '.join(zero)}; {left} "
            "(evaluate more examples with --limit, or fine-tune longer)"
        )
    return len(zero) < len(dense)


def search_amplification(
    base: str | os.PathLike,
    delta: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tasks: Sequence[str],
    dense: str | os.PathLike,
    strategy: str = "coordinate",
    options: Any = None,
    densities: Sequence[float] = (0.1, 0.2),
    split: str = "validation",
    limit: int | None = None,
    combine: str = "max",
    dp_options: Any = None,
    scope: str = DEFAULT_SCOPE,
    batch_size: int = 32,
    cache: str | os.PathLike | None = None,
    device: str = "auto",
    trace: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    **option_values,
) -> SearchReport:
    """Search the band factors of the delta folder ``delta`` (of ``base``) and write the amplified delta at ``out``.

    ``dense`` is the dense fine-tune's model folder (evaluated once, cached) or a JSON file of its scores on
    ``split``. The strategy's options come as ``options`` (its dataclass) or by name (``budget=12, step=0.1``; None
    means the default). ``trace``, when given, is a CSV path for a DVC plot; the JSON trace goes beside it (same
    stem). Returns the SearchReport; the factors are ``report.result.best_factors``.
    """
    settings = SearchSettings(
        tasks=tuple(tasks),
        strategy=strategy,
        options=options or option_values,
        densities=tuple(densities),
        split=split,
        limit=limit,
        combine=combine,
        dp=dp_options,
        scope=scope,
        batch_size=batch_size,
    )
    out = Path(out)
    check_output_free(out, overwrite)
    trace_csv = Path(trace) if trace is not None else None
    if trace_csv is not None:
        check_output_free(trace_csv, overwrite)
    manifest, base_hash = _checked_delta(delta, base)
    cache_path = Path(cache) if cache is not None else default_cache_path()
    dev = resolve_device(device)

    dense_found, dense_hash, dense_source = dense_scores(
        Path(dense), manifest, settings, cache_path, str(dev), base=base
    )
    dense_primary = primary_scores(dense_found)
    log(f"dense fine-tune on {split}: {dense_primary}")
    normalised = informative_tasks(dense_primary, log)

    run = _CandidateRun(settings, base, delta, dev, log)
    result = run.search(manifest["content_hash"], base_hash, dense_primary, cache_path)
    report = SearchReport(
        out,
        result,
        dense_primary,
        run.candidate_scores,
        run.cached.real_evaluations + (dense_source == "evaluated"),
        run.cached.hits + (dense_source == "cache"),
        run.setup_s,
        run.timings,
        settings.fingerprint(manifest["content_hash"], base_hash, dense_hash),
        normalised=normalised,
    )
    _write_outputs(report, settings, delta, out, trace_csv, device=str(dev), overwrite=overwrite, progress=progress)
    return report


class _CandidateRun:
    """The base loaded once, the DP bands computed once and the tasks prepared once; each candidate's factors are
    then set in place, scored through the evaluation cache, and timed."""

    def __init__(self, settings: SearchSettings, base, delta, device, log: Callable[[str], None]):
        from dppa.evaluation.harness import Evaluator, compute_dtype, load_model, to_compute_dtype
        from dppa.evaluation.weights import candidates_for_delta

        started = time.perf_counter()
        self.settings, self.log = settings, log
        self.compute = compute_dtype(device)
        model, tokenizer = load_model(base, device=device, upcast=False)
        saved = to_compute_dtype(model)
        self.weights = candidates_for_delta(
            model,
            delta,
            settings.densities,
            combine=settings.combine,
            device=str(device),
            options=settings.dp,
            scope=settings.scope,
            saved_dtypes=saved,
        )
        self.evaluator = Evaluator(
            model, tokenizer, settings.tasks, split=settings.split, limit=settings.limit, batch_size=settings.batch_size
        )
        self.setup_s = time.perf_counter() - started
        self.timings: list[CandidateTiming] = []
        self.candidate_scores: dict[tuple[float, ...], Scores] = {}
        self.cached: CachedEvaluator | None = None

    def _evaluate(self, factors: tuple[float, ...]) -> Scores:
        t0 = time.perf_counter()
        self.weights.amplify(factors)  # the next candidate overwrites it: the base is put back once, at the end
        t1 = time.perf_counter()
        scores = self.evaluator.scores()
        self.timings.append(CandidateTiming(tuple(factors), t1 - t0, time.perf_counter() - t1))
        return scores

    def search(self, delta_hash: str, base_hash: str, dense: dict[str, float], cache: Path) -> SearchResult:
        """The strategy's walk over candidates, maximising the normalised score against `dense`."""
        key = functools.partial(
            eval_key,
            model=(delta_hash,),
            base=base_hash,
            tasks=self.settings.tasks,
            split=self.settings.split,
            limit=self.settings.limit,
            recipe=self.settings.candidate_recipe(),
            compute=self.compute,
        )
        self.cached = CachedEvaluator(self._evaluate, EvalCache(cache), key)

        def objective(factors: tuple[float, ...]) -> float:
            found = self.cached(factors)
            self.candidate_scores[tuple(factors)] = found
            scores = primary_scores(found)
            value, _ = scoring.objective(scores, dense)
            self.log(f"factors {list(factors)}: objective {value:.4f}  {scores}")
            return value

        try:
            return self.settings.run(objective)
        finally:
            self.weights.restore()


def _checked_delta(delta, base) -> tuple[dict, str]:
    """The delta's manifest and the base's content hash, once both are known to be what the search needs."""
    manifest = read_manifest(delta)
    if manifest.get("kind") != "delta" or not manifest.get("content_hash"):
        raise DppaError(
            f"{delta}: not a delta folder written by `dppa extract` (its manifest has no delta "
            "content hash); the search needs the unpruned delta"
        )
    base_hash = recorded_hash(base, manifest.get("base"))
    if manifest.get("base", {}).get("content_hash") not in (None, base_hash):
        raise DppaError(f"{base}: is not the base {delta} was extracted from (content hashes differ)")
    return manifest, base_hash


def dense_scores(
    dense: Path, manifest: dict, settings: SearchSettings, cache: Path, device: str, base: Path | None = None
) -> tuple[Scores, str, str]:
    """The dense fine-tune's scores on the search split, its identity for the fingerprint, and where the scores came
    from: "file", "cache" or "evaluated". A model folder is scored as the evaluate stage scores it (same cache key);
    a LoRA adapter folder as the model it makes of `base`."""
    if dense.is_file():
        scores = read_dense_scores(dense, settings.tasks)
        return scores, hashlib.sha256(json.dumps(scores, sort_keys=True).encode()).hexdigest(), "file"
    if not (dense / "config.json").exists() and not is_adapter(dense):
        raise DppaError(f"{dense}: neither a model or adapter folder (no config.json) nor a scores JSON file")
    ft_hash = recorded_hash(dense, manifest.get("finetuned"), base)
    scores, from_cache = score_folder(
        dense,
        settings.tasks,
        split=settings.split,
        limit=settings.limit,
        batch_size=settings.batch_size,
        device=device,
        cache=cache,
        digest=ft_hash,
        base=base,
    )
    return scores, ft_hash, "cache" if from_cache else "evaluated"


def _write_outputs(
    report: SearchReport,
    settings: SearchSettings,
    delta,
    out: Path,
    trace_csv: Path | None,
    *,
    device: str,
    overwrite: bool,
    progress: bool,
) -> None:
    from dppa.sparsify.bands import amplify_delta

    trace_json = json.dumps(report.trace_json(settings), indent=1) + "\n"
    trace_rows = rows_to_csv(report.trace_rows())
    # amplify_delta writes its own folder atomically; it is written into our temporary folder (replacing it) so that
    # the trace files join it before the one rename that makes `out` appear complete.
    with atomic_dir(out, overwrite) as tmp:
        amplify_delta(
            delta,
            tmp,
            densities=list(settings.densities),
            factors=list(report.result.best_factors),
            combine=settings.combine,
            options=settings.dp,
            scope=settings.scope,
            device=device,
            overwrite=True,
            progress=progress,
            extra_manifest={"search": report.summary()},
        )
        (tmp / TRACE_JSON).write_text(trace_json)
        (tmp / TRACE_CSV).write_text(trace_rows)
    if trace_csv is not None:
        atomic_write_text(trace_csv, trace_rows)
        atomic_write_text(trace_csv.with_suffix(".json"), trace_json)
