"""Evaluation through lm-evaluation-harness: model folders, models in memory, and base + delta without writing.

Zoo tasks (`zoo_<domain>`) are always known; folders named in `DPPA_TASK_PATH` (os.pathsep-separated) or passed as
`include_path` add more local tasks; any other name is looked up among the harness's own tasks (hub data sets).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from dppa.errors import DppaError
from dppa.zoo.tasks import ZOO_TAG, ensure_tasks_dir, zoo_task_names

SPLITS = ("validation", "test")
TASK_PATH_ENV = "DPPA_TASK_PATH"


def parse_task_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise DppaError("--tasks is empty; name at least one task, e.g. --tasks zoo_arith,zoo_facts")
    return names


def _include_paths(extra: Sequence[str | os.PathLike] = ()) -> tuple[str, ...]:
    env = [p for p in os.environ.get(TASK_PATH_ENV, "").split(os.pathsep) if p]
    return tuple(str(p) for p in [ensure_tasks_dir(), *env, *extra])


@functools.lru_cache(maxsize=4)
def _task_manager(include_paths: tuple[str, ...], include_defaults: bool):
    # Indexing the harness's thousands of built-in tasks takes seconds, so it is done only when a name needs it,
    # and the index is reused across the many evaluations of a search.
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths), include_defaults=include_defaults)


def load_tasks(names: Sequence[str], split: str, include_path: Sequence[str | os.PathLike] = ()) -> dict:
    """Task objects by name, each set to evaluate on `split`."""
    if split not in SPLITS:
        raise DppaError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    local_only = set(names) <= {ZOO_TAG, *zoo_task_names()} and not include_path and not os.environ.get(TASK_PATH_ENV)
    manager = _task_manager(_include_paths(include_path), include_defaults=not local_only)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise DppaError(
            f"unknown task(s) {', '.join(unknown)}; zoo tasks are {', '.join(zoo_task_names())}, "
            f"other local task folders can be added with {TASK_PATH_ENV}"
        )
    tasks = manager.load(list(names))["tasks"]
    for name, task in tasks.items():
        _select_split(name, task, split)
    return tasks


def _select_split(name: str, task, split: str) -> None:
    # The harness evaluates the test split when a task has one, else validation; hiding the test split makes it
    # use validation.
    if split == "test":
        if not task.has_test_docs():
            raise DppaError(f"task {name} has no test split; use --split validation")
    else:
        if not task.has_validation_docs():
            raise DppaError(f"task {name} has no validation split; use --split test")
        task.set_config("test_split", None)


def metrics_from_results(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from the harness's results; `,none` (no filter) is dropped from metric names.

    Metrics are the harness's "metric,filter" keys; bookkeeping (alias, sample_len) and stderrs are left out.
    """
    table: dict[str, dict[str, float]] = {}
    for task, values in results["results"].items():
        metrics = {}
        for key, value in values.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metrics[key.removesuffix(",none")] = float(value)
        table[task] = metrics
    return table


def run_harness(lm, tasks: Sequence[str], *, split: str, limit: int | None, include_path=()) -> dict:
    """The harness's full results for an lm-eval LM object (deterministic: greedy decoding, fixed seeds)."""
    from lm_eval import simple_evaluate

    task_objects = load_tasks(tasks, split, include_path)
    results = simple_evaluate(
        model=lm,
        tasks=list(task_objects.values()),
        limit=limit,
        bootstrap_iters=0,
        log_samples=False,
        # The tasks are already loaded objects; without a manager simple_evaluate indexes the harness's ~14k task
        # YAMLs on every call (measured: 29 of 39 s per call on the tiny zoo).
        task_manager=_task_manager(_include_paths(include_path), include_defaults=False),
    )
    if results is None:
        raise DppaError("lm-eval returned no results")
    return results


def evaluate_model(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    split: str,
    limit: int | None = None,
    batch_size: int = 32,
    include_path: Sequence[str | os.PathLike] = (),
    full_results: bool = False,
) -> dict:
    """Scores of a model object already in memory, {task: {metric: value}} (or the harness's full results)."""
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = run_harness(lm, tasks, split=split, limit=limit, include_path=include_path)
    return results if full_results else metrics_from_results(results)


def evaluate_folder(
    path: str | os.PathLike,
    tasks: Sequence[str],
    *,
    split: str,
    limit: int | None = None,
    batch_size: int = 32,
    device: str | None = None,
    include_path: Sequence[str | os.PathLike] = (),
    full_results: bool = False,
) -> dict:
    """Scores of a model folder (or a hub name), loaded from disk and then evaluated like a model in memory."""
    model, tokenizer = load_model(path, device=device)
    return evaluate_model(
        model, tokenizer, tasks, split=split, limit=limit, batch_size=batch_size, include_path=include_path,
        full_results=full_results,
    )  # fmt: skip


def load_model(path: str | os.PathLike, device: str | None = None):
    """(model, tokenizer) of an HF model folder or hub name, in its saved dtype, on `device` (default: cuda if any).

    Loaded here rather than by the harness, whose loader needs `accelerate` for device placement.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = str(path)
    if Path(text).exists() and not (Path(text) / "config.json").exists():
        raise DppaError(f"{text}: not a model folder (no config.json)")
    if not Path(text).exists() and (text.startswith((".", "/", "~")) or text.count("/") > 1):
        raise DppaError(f"{text}: no such model folder")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(text, dtype="auto", trust_remote_code=False).to(device)
    return model.eval(), AutoTokenizer.from_pretrained(text, trust_remote_code=False)


@torch.no_grad()
def add_delta_(model: torch.nn.Module, delta_folder: str | os.PathLike, factor: float = 1.0) -> torch.nn.Module:
    """model += factor * delta, in place, reading the delta folder tensor by tensor; returns the model."""
    from dppa.io.reader import open_checkpoint

    params = dict(model.named_parameters())
    with open_checkpoint(delta_folder) as reader:
        missing = [n for n in reader.names() if n not in params]
        if missing:
            raise DppaError(f"{delta_folder}: tensor {missing[0]} is not a parameter of the model; wrong base model?")
        for name in reader.names():
            param = params[name]
            if tuple(reader.shape(name)) != tuple(param.shape):
                raise DppaError(
                    f"{delta_folder}: tensor {name} has shape {reader.shape(name)}, the model's is {tuple(param.shape)}"
                )
            param.add_(reader.get(name, dtype=torch.float32).to(param.device), alpha=factor)
    return model


def primary_metric(task_metrics: dict[str, float]) -> str:
    """The metric a task is scored by: exact_match when present (zoo tasks), else the first one the harness lists."""
    if "exact_match" in task_metrics:
        return "exact_match"
    if not task_metrics:
        raise DppaError("no metric in the task's results")
    return next(iter(task_metrics))


def normalised_score(candidate: dict, finetuned: dict, task: str, metric: str | None = None) -> float:
    """candidate's score / the dense fine-tune's score on the same task and split (1.0 = as good as the fine-tune)."""
    metric = metric or primary_metric(finetuned[task])
    reference = finetuned[task][metric]
    if reference == 0 or math.isnan(reference):
        raise DppaError(f"task {task}: the fine-tuned model scores {reference} on {metric}; nothing to normalise by")
    return candidate[task][metric] / reference
