"""The amplification search of one fine-tune, end to end: DP bands -> factor search on validation -> amplified delta.

The base model is loaded once; each candidate (base + amplified delta for some factors) is set in place by
``dppa.evaluation.weights.CandidateBuilder`` and scored through the harness in memory, so no model is written per step.
The objective is spec section 3's: the geometric mean over the fine-tune's tasks of candidate score / dense
fine-tune score, both on the validation split (the test split is kept for final numbers and refused here).

Every score, the dense fine-tune's included, goes through the persistent evaluation cache keyed by what determines
it, so a repeated or resumed search evaluates nothing twice. The result is the amplified delta written by
``dppa.sparsify.bands.amplify_delta`` with the chosen factors and the search summary in its manifest, plus the trace
(``search_trace.json`` with timings, ``search_trace.csv`` for a DVC plot) inside it and optionally elsewhere.

``search_amplification`` is the plain-function entry point (the CLI and the pipeline's amplify stage call it).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from dppa.errors import DppaError
from dppa.evaluation.cache import CachedEvaluator, EvalCache, EvalContext
from dppa.io.atomic import atomic_dir, check_output_free
from dppa.io.manifest import read_manifest
from dppa.io.reader import open_checkpoint
from dppa.io.writer import ContentHasher, tensor_bytes
from dppa.compute import resolve_device
from dppa.sparsify.scope import DEFAULT_SCOPE
from dppa.search.strategies import SearchResult, normalised_geomean, run_strategy

STRATEGY_NAMES = {"reference": "coordinate", "coordinate": "coordinate", "pattern": "pattern"}
DEFAULT_BUDGET = {"coordinate": 100, "pattern": 20}
TRACE_JSON = "search_trace.json"
TRACE_CSV = "search_trace.csv"
CACHE_ENV = "DPPA_EVAL_CACHE"

Scores = dict[str, dict[str, float]]  # {task: {metric: value}}, as dppa.evaluation.harness returns them


def default_cache_path() -> Path:
    """Where scores are cached unless told otherwise: $DPPA_EVAL_CACHE, else ~/.cache/dppa/evalcache.jsonl.

    One file serves every search safely: a key holds everything that determines a score.
    """
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dppa" / "evalcache.jsonl")


def checkpoint_hash(folder: str | os.PathLike) -> str:
    """The content hash the engine's manifests use (sha256 over tensor names, dtypes, shapes and bytes)."""
    hasher = ContentHasher()
    reader = open_checkpoint(folder)
    for name in reader.names():
        hasher.start(name, reader.dtype(name), reader.shape(name))
        for _, chunk in reader.iter_chunks(name, 1 << 24):
            hasher.update(tensor_bytes(chunk))
    return hasher.hexdigest()


def recorded_hash(folder: str | os.PathLike, record: Mapping | None) -> str:
    """``folder``'s content hash: taken from a manifest's source record when it names this folder, else computed."""
    if record and record.get("content_hash") and Path(record.get("path", "")) == Path(folder).resolve():
        return record["content_hash"]
    return checkpoint_hash(folder)


def task_data_versions(tasks: Sequence[str]) -> dict:
    """{"zoo_data": fingerprint} when a zoo task is among ``tasks`` (its data ships with the package), else {}."""
    from dppa.zoo.tasks import data_fingerprint, zoo_task_names

    return {"zoo_data": data_fingerprint()} if set(tasks) & set(zoo_task_names()) else {}


def primary_scores(scores: Scores) -> dict[str, float]:
    """{task: value of the task's primary metric} (exact_match for zoo tasks)."""
    from dppa.evaluation.harness import primary_metric

    return {task: metrics[primary_metric(metrics)] for task, metrics in scores.items()}


@dataclass(frozen=True)
class SearchSettings:
    """What the search is asked for; everything here but ``batch_size`` can change its result."""

    tasks: tuple[str, ...]
    strategy: str = "coordinate"
    densities: tuple[float, ...] = (0.1, 0.2)
    split: str = "validation"
    limit: int | None = None
    budget: int | None = None
    step: float = 0.1
    combine: str = "max"
    lamda: float = 0.08
    layer_mult: float = 3.0
    unit_mult: float = 5.0
    scope: str = DEFAULT_SCOPE
    batch_size: int = 32

    def __post_init__(self):
        if self.strategy not in STRATEGY_NAMES:
            raise DppaError(f"--strategy {self.strategy}: unknown; use one of reference (= coordinate), pattern")
        object.__setattr__(self, "strategy", STRATEGY_NAMES[self.strategy])
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "densities", tuple(float(d) for d in self.densities))
        if not self.tasks:
            raise DppaError("--tasks is empty; name the fine-tune's own tasks, e.g. --tasks zoo_arith")
        if self.split == "test":
            raise DppaError("--split test: the factors are tuned on the validation split; the test split is kept "
                            "for the final numbers (use --split validation)")
        if self.budget is not None and self.budget < 1:
            raise DppaError(f"--budget {self.budget}: must allow at least one evaluation")

    @property
    def max_evals(self) -> int:
        return self.budget if self.budget is not None else DEFAULT_BUDGET[self.strategy]

    def candidate_recipe(self) -> dict:
        """The cache key's recipe for a candidate: whatever besides factors, deltas and base shapes its weights,
        and the version of the zoo tasks' data (it is generated by the package, so it could change with it)."""
        return {"candidate": "dppa-bands", "densities": list(self.densities), "combine": self.combine,
                "lamda": self.lamda, "layer_mult": self.layer_mult, "unit_mult": self.unit_mult,
                "scope": self.scope, "dtype": "float32", **task_data_versions(self.tasks)}

    def fingerprint(self, delta_hash: str, base_hash: str, reference_hash: str) -> str:
        """Identifies a search's result: same fingerprint, same factors (given the same harness and data)."""
        body = json.dumps({"delta": delta_hash, "base": base_hash, "reference": reference_hash,
                           "tasks": sorted(self.tasks), "strategy": self.strategy, "split": self.split,
                           "limit": self.limit, "budget": self.max_evals, "step": self.step,
                           **self.candidate_recipe()}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()


@dataclass
class CandidateTiming:
    factors: tuple[float, ...]
    build_s: float  # setting the weights to the candidate and back to the base
    evaluate_s: float  # the harness on the candidate


@dataclass
class SearchReport:
    """What one search did: the result, where it went, how many evaluations were real, and the time split."""

    output: Path
    result: SearchResult
    reference_scores: dict[str, float]
    candidate_scores: dict[tuple[float, ...], Scores]
    real_evaluations: int  # harness runs this call made (candidates and the dense fine-tune); 0 on a cached rerun
    cache_hits: int
    setup_s: float  # loading the base and computing the DP bands, once per search
    timings: list[CandidateTiming] = field(default_factory=list)
    fingerprint: str = ""
    normalised: bool = True  # False when the dense fine-tune scored 0 on a task and the objective is raw

    def build_over_evaluate(self) -> float | None:
        """Total candidate build time / total evaluation time over the candidates evaluated for real."""
        evaluate = sum(t.evaluate_s for t in self.timings)
        return sum(t.build_s for t in self.timings) / evaluate if evaluate > 0 else None

    def summary(self) -> dict:
        """The manifest's record of the search (the full trace lives in search_trace.json)."""
        return {"strategy": self.result.strategy, "best_factors": list(self.result.best_factors),
                "best_score": self.result.best_score, "n_candidates": self.result.n_evals,
                "stop_reason": self.result.stop_reason, "reference_scores": self.reference_scores,
                "objective": "normalised geometric mean" if self.normalised else "raw geometric mean",
                "real_evaluations": self.real_evaluations, "cache_hits": self.cache_hits,
                "fingerprint": self.fingerprint}

    def trace_rows(self) -> list[dict]:
        """One row per candidate: factors, objective, per-task scores, decision, timing (blank when cached)."""
        timing = {t.factors: t for t in self.timings}
        rows = []
        for row, ev in zip(self.result.trace_rows(), self.result.trace):
            for task, value in primary_scores(self.candidate_scores[ev.factors]).items():
                row[task] = value
            t = timing.get(ev.factors)
            row.update(cached=t is None, build_s="" if t is None else round(t.build_s, 4),
                       evaluate_s="" if t is None else round(t.evaluate_s, 4))
            rows.append(row)
        return rows

    def trace_json(self, settings: SearchSettings) -> dict:
        ratio = self.build_over_evaluate()
        return {**self.result.to_dict(), "settings": _settings_record(settings), "summary": self.summary(),
                "candidate_scores": [{"factors": list(f), "scores": s} for f, s in self.candidate_scores.items()],
                "timing": {"setup_s": round(self.setup_s, 4),
                           "candidates": [{"factors": list(t.factors), "build_s": round(t.build_s, 5),
                                           "evaluate_s": round(t.evaluate_s, 4)} for t in self.timings],
                           "build_s_total": round(sum(t.build_s for t in self.timings), 5),
                           "evaluate_s_total": round(sum(t.evaluate_s for t in self.timings), 4),
                           "build_over_evaluate": None if ratio is None else round(ratio, 5)}}


def _settings_record(settings: SearchSettings) -> dict:
    return {"tasks": list(settings.tasks), "strategy": settings.strategy, "densities": list(settings.densities),
            "split": settings.split, "limit": settings.limit, "max_evals": settings.max_evals, "step": settings.step,
            "combine": settings.combine, "lamda": settings.lamda, "layer_mult": settings.layer_mult,
            "unit_mult": settings.unit_mult, "scope": settings.scope}


def rows_to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    fields = list(dict.fromkeys(key for row in rows for key in row))
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_text_atomic(path: Path, text: str, overwrite: bool = True) -> None:
    """Write ``path`` whole or not at all (temporary sibling, then rename)."""
    if path.exists() and not overwrite:
        raise DppaError(f"{path}: already exists; choose another path or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_model(folder: str | os.PathLike, device: torch.device):
    """A causal LM and its tokenizer from a local folder, float32 (the dtype candidates are computed in)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)
    model.to(device).eval()
    return model, AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def read_reference_scores(path: Path, tasks: Sequence[str]) -> Scores:
    """Dense fine-tune scores from a JSON file, {task: {metric: value}} (as `dppa eval --output` writes) or
    {task: value}."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DppaError(f"{path}: cannot read reference scores ({exc}); give the dense fine-tune's folder or a "
                        "metrics JSON from `dppa eval --output`") from None
    scores = {t: (v if isinstance(v, dict) else {"score": float(v)}) for t, v in data.items() if t in tasks}
    missing = [t for t in tasks if t not in scores]
    if missing:
        raise DppaError(f"{path}: no reference score for task(s) {', '.join(missing)}")
    return scores


def objective_reference(reference: dict[str, float], log: Callable[[str], None]) -> dict[str, float]:
    """What candidate scores are divided by: the dense fine-tune's scores, or 1 for every task when it scores 0 on
    one (the normalisation is a constant factor of the geometric mean, so the search path is the same either way;
    only the objective's unit changes from "relative to the fine-tune" to raw)."""
    zero = [task for task, value in reference.items() if not value > 0]
    if not zero:
        return reference
    log(f"warning: the dense fine-tune scores 0 on {', '.join(zero)}; the objective is the raw geometric mean "
        "(evaluate more examples with --limit for a normalised one)")
    return {task: 1.0 for task in reference}


def search_amplification(
    base: str | os.PathLike,
    delta: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tasks: Sequence[str],
    reference: str | os.PathLike,
    strategy: str = "coordinate",
    densities: Sequence[float] = (0.1, 0.2),
    split: str = "validation",
    limit: int | None = None,
    budget: int | None = None,
    step: float = 0.1,
    combine: str = "max",
    lamda: float = 0.08,
    layer_mult: float = 3.0,
    unit_mult: float = 5.0,
    scope: str = DEFAULT_SCOPE,
    batch_size: int = 32,
    cache: str | os.PathLike | None = None,
    device: str = "auto",
    trace: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> SearchReport:
    """Search the band factors of the delta folder ``delta`` (of ``base``) and write the amplified delta at ``out``.

    ``reference`` is the dense fine-tune's model folder (evaluated once, cached) or a JSON file of its scores on
    ``split``. ``trace``, when given, is a CSV path for a DVC plot; the JSON trace goes beside it (same stem).
    Returns the SearchReport; the factors are ``report.result.best_factors``.
    """
    settings = SearchSettings(tuple(tasks), strategy, tuple(densities), split, limit, budget, step, combine, lamda,
                              layer_mult, unit_mult, scope, batch_size)
    out = Path(out)
    check_output_free(out, overwrite)
    trace_csv = Path(trace) if trace is not None else None
    if trace_csv is not None:
        check_output_free(trace_csv, overwrite)
    manifest = read_manifest(delta)
    if manifest.get("kind") != "delta" or not manifest.get("content_hash"):
        raise DppaError(f"{delta}: not a delta folder written by `dppa extract` (its manifest has no delta "
                        "content hash); the search needs the unpruned delta")
    base_hash = recorded_hash(base, manifest.get("base"))
    if manifest.get("base", {}).get("content_hash") not in (None, base_hash):
        raise DppaError(f"{base}: is not the base {delta} was extracted from (content hashes differ)")
    evals = EvalCache(cache if cache is not None else default_cache_path())
    dev = resolve_device(device)

    dense, reference_hash, ref_source = reference_scores(Path(reference), manifest, settings, evals, dev, base_hash)
    reference_primary = primary_scores(dense)
    log(f"dense fine-tune on {split}: {reference_primary}")
    divisor = objective_reference(reference_primary, log)

    started = time.perf_counter()
    model, tokenizer = load_model(base, dev)
    from dppa.evaluation.weights import builder_for_delta

    builder = builder_for_delta(model, delta, settings.densities, combine=combine, device=str(dev), lamda=lamda,
                                layer_mult=layer_mult, unit_mult=unit_mult, scope=scope)
    setup_s = time.perf_counter() - started

    timings: list[CandidateTiming] = []
    candidate_scores: dict[tuple[float, ...], Scores] = {}

    def evaluate_candidate(factors: tuple[float, ...]) -> Scores:
        from dppa.evaluation.harness import evaluate_model

        t0 = time.perf_counter()
        builder.apply(factors)
        t1 = time.perf_counter()
        try:
            scores = evaluate_model(model, tokenizer, settings.tasks, split=split, limit=limit, batch_size=batch_size)
        finally:
            t2 = time.perf_counter()
            builder.restore()
        timings.append(CandidateTiming(tuple(factors), (t1 - t0) + (time.perf_counter() - t2), t2 - t1))
        return scores

    context = EvalContext(deltas=(manifest["content_hash"],), base=base_hash, tasks=settings.tasks, split=split,
                          limit=limit, recipe=settings.candidate_recipe())
    cached = CachedEvaluator(evaluate_candidate, evals, context)

    def objective(factors: tuple[float, ...]) -> float:
        scores = cached(factors)
        candidate_scores[tuple(factors)] = scores
        value = normalised_geomean(primary_scores(scores), divisor)
        log(f"factors {list(factors)}: objective {value:.4f}  {primary_scores(scores)}")
        return value

    result = run_strategy(settings.strategy, objective, step=step, max_evals=settings.max_evals)
    report = SearchReport(out, result, reference_primary, candidate_scores,
                          cached.real_evaluations + (ref_source == "evaluated"), cached.hits + (ref_source == "cache"),
                          setup_s, timings, settings.fingerprint(manifest["content_hash"], base_hash, reference_hash),
                          normalised=divisor == reference_primary)
    _write_outputs(report, settings, delta, out, trace_csv, device=str(dev), overwrite=overwrite, progress=progress)
    return report


def reference_scores(reference: Path, manifest: dict, settings: SearchSettings, evals: EvalCache,
                     device: torch.device | str, base_hash: str) -> tuple[Scores, str, str]:
    """The dense fine-tune's scores on the search split, its identity for the fingerprint, and where the scores came
    from: "file", "cache" or "evaluated"."""
    if reference.is_file():
        scores = read_reference_scores(reference, settings.tasks)
        return scores, hashlib.sha256(json.dumps(scores, sort_keys=True).encode()).hexdigest(), "file"
    if not (reference / "config.json").exists():
        raise DppaError(f"{reference}: neither a model folder (no config.json) nor a scores JSON file")
    ft_hash = recorded_hash(reference, manifest.get("finetuned"))
    context = EvalContext(deltas=(ft_hash,), base=base_hash, tasks=settings.tasks, split=settings.split,
                          limit=settings.limit, recipe={"candidate": "model-folder", "dtype": "float32",
                                  **task_data_versions(settings.tasks)})
    key = context.key(())
    scores = evals.get(key)
    if scores is not None:
        return scores, ft_hash, "cache"
    from dppa.evaluation.harness import evaluate_model

    model, tokenizer = load_model(reference, torch.device(device))
    scores = evaluate_model(model, tokenizer, settings.tasks, split=settings.split, limit=settings.limit,
                            batch_size=settings.batch_size)
    evals.put(key, scores)
    return scores, ft_hash, "evaluated"


def _write_outputs(report: SearchReport, settings: SearchSettings, delta, out: Path, trace_csv: Path | None, *,
                   device: str, overwrite: bool, progress: bool) -> None:
    from dppa.sparsify.bands import amplify_delta

    trace_json = json.dumps(report.trace_json(settings), indent=1) + "\n"
    trace_rows = rows_to_csv(report.trace_rows())
    # amplify_delta writes its own folder atomically; it is written into our temporary folder (replacing it) so that
    # the trace files join it before the one rename that makes `out` appear complete.
    with atomic_dir(out, overwrite) as tmp:
        amplify_delta(delta, tmp, densities=list(settings.densities), factors=list(report.result.best_factors),
                      combine=settings.combine, lamda=settings.lamda, layer_mult=settings.layer_mult,
                      unit_mult=settings.unit_mult, scope=settings.scope, device=device, overwrite=True,
                      progress=progress, extra_manifest={"search": report.summary()})
        (tmp / TRACE_JSON).write_text(trace_json)
        (tmp / TRACE_CSV).write_text(trace_rows)
    if trace_csv is not None:
        write_text_atomic(trace_csv, trace_rows)
        write_text_atomic(trace_csv.with_suffix(".json"), trace_json)
