"""Evaluation through lm-evaluation-harness: model folders, and models in memory scored again as their weights change.

Tasks come from the sources of dppa.evaluation.task_sources: packaged ones (the zoo's `zoo_<domain>`), folders named
in `DPPA_TASK_PATH` (os.pathsep-separated) or passed as `include_path`, and any other name is looked up among the
harness's own tasks (hub data sets).

On CPU a model computes in float32 whatever dtype it was saved in (`compute_dtype`): its weights are the saved values,
upcast exactly, so only the arithmetic's rounding differs from a bf16 evaluation, and CPUs without native bf16
arithmetic (AVX2 machines, most of them) run bf16 products several times slower than float32 ones (SmolLM2-135M on 200
test examples: 41 s in bf16, 10 s in float32, same scores to 0.005). On a GPU it computes in its saved dtype.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from dppa.errors import DppaError
from dppa.evaluation.lm_eval_private import memoise_template_compile
from dppa.evaluation.task_sources import TASK_PATH_ENV, packaged_sources, task_sources

SPLITS = ("validation", "test")


def parse_task_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise DppaError("--tasks is empty; name at least one task, e.g. --tasks zoo_arith,zoo_facts")
    return names


@functools.lru_cache(maxsize=4)
def _task_manager(include_paths: tuple[str, ...], include_defaults: bool):
    # Indexing the harness's thousands of built-in tasks takes seconds, so it is done only when a name needs it,
    # and the index is reused across the many evaluations of a search.
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths), include_defaults=include_defaults)


def load_tasks(names: Sequence[str], split: str, include_path: Sequence[str | os.PathLike] = ()) -> dict:
    """The harness's task dict ({"tasks": {name: Task}, "groups": ...}), each task set to evaluate on `split`."""
    if split not in SPLITS:
        raise DppaError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    sources = task_sources(include_path)
    packaged = sorted(n for source in packaged_sources() for n in source.task_names())
    # The harness's own thousands of tasks are indexed only when a name needs them; a user's task folder may refer
    # to them (groups, includes), so with one they always are.
    only_packaged = set(names) <= set(packaged) and len(sources) == len(packaged_sources())
    folders = tuple(str(source.folder()) for source in sources)
    manager = _task_manager(folders, include_defaults=not only_packaged)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise DppaError(
            f"unknown task(s) {', '.join(unknown)}; packaged tasks are "
            f"{', '.join(packaged) or 'none (is dppa installed? `make install` registers its zoo tasks)'}; "
            f"local task folders can be added with {TASK_PATH_ENV}"
        )
    loaded = manager.load(list(names))
    for name, task in loaded["tasks"].items():
        _select_split(name, task, split)
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
    return loaded


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


class Evaluator:
    """Scores one model in memory, again and again, as its weights change (the search's candidates).

    The harness's model wrapper, the tasks and their requests are built once (``dppa.evaluation.prepared``); each
    call runs the model on the prepared requests and the tasks' own metrics and aggregation, as the harness's
    evaluation loop does. lm-eval's ``simple_evaluate`` also collects environment information on every call (it
    runs ``pip list`` and more in subprocesses, 0.5-5 s), which has nothing to do with the scores, and its
    ``evaluate`` builds every request again. The seeds ``simple_evaluate`` sets are set here before the requests
    are built (the few-shot examples are drawn then), and before each call where the harness's generation may
    sample, so results equal its results.
    """

    def __init__(
        self,
        model,
        tokenizer,
        tasks: Sequence[str],
        *,
        split: str,
        limit: int | None = None,
        batch_size: int = 32,
        include_path: Sequence[str | os.PathLike] = (),
        repeated: bool = True,
    ):
        """``repeated=False``: for one evaluation (``dppa.evaluation.prepared.PreparedEvaluation``)."""
        from lm_eval.models.huggingface import HFLM

        from dppa.evaluation.prepared import PreparedEvaluation

        memoise_template_compile()
        self.tasks = load_tasks(tasks, split, include_path)
        self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        self.limit = limit
        _seed(self.tasks)
        self.prepared = PreparedEvaluation(self.lm, self.tasks, limit, repeated=repeated)

    def results(self) -> dict:
        """The harness's full results (deterministic: greedy decoding, fixed seeds)."""
        if self.prepared.uses_rng:
            _seed(self.tasks)
        return self.prepared.results()

    def scores(self) -> dict[str, dict[str, float]]:
        """{task: {metric: value}}."""
        return metrics_from_results(self.results())


def _seed(task_dict: dict) -> None:
    """The seeds lm-eval's ``simple_evaluate`` sets before it builds requests and evaluates."""
    import random

    import numpy as np
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED

    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    torch.manual_seed(DEFAULT_OTHER_SEED)
    for task in task_dict["tasks"].values():
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)


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
    evaluator = Evaluator(
        model, tokenizer, tasks, split=split, limit=limit, batch_size=batch_size, include_path=include_path,
        repeated=False,
    )  # fmt: skip
    return evaluator.results() if full_results else evaluator.scores()


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
    base: str | os.PathLike | None = None,
) -> dict:
    """Scores of a model folder (or a hub name, or a LoRA adapter folder on `base`), loaded from disk and then
    evaluated like a model in memory."""
    model, tokenizer = load_model(path, device=device, base=base)
    return evaluate_model(
        model, tokenizer, tasks, split=split, limit=limit, batch_size=batch_size, include_path=include_path,
        full_results=full_results,
    )  # fmt: skip


def model_device(device: str | torch.device | None) -> torch.device:
    """Where a model is evaluated: `device`, by default cuda if any, else cpu."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def compute_dtype(device: str | torch.device | None) -> str:
    """What a model evaluated on `device` computes in, as the evaluation cache's keys record it: "float32" on CPU,
    "saved" (the checkpoint's own dtype) elsewhere."""
    return "float32" if model_device(device).type == "cpu" else "saved"


def to_compute_dtype(model: torch.nn.Module) -> dict[str, torch.dtype]:
    """Upcast, in place, a CPU model's floating-point parameters and buffers to float32 (`compute_dtype`); return
    each parameter's dtype before, by name (tied names included), so that weights set later can be rounded as they
    would be saved (dppa.evaluation.weights.CandidateWeights)."""
    saved = {name: param.dtype for name, param in model.named_parameters(remove_duplicate=False)}
    first = next(iter(model.parameters()), None)
    if first is not None and compute_dtype(first.device) == "float32":
        model.float()
    return saved


def load_model(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    base: str | os.PathLike | None = None,
    upcast: bool = True,
):
    """(model, tokenizer) of an HF model folder or hub name, with its saved weights, on `device` (default: cuda if
    any), computing in `compute_dtype(device)` (`upcast=False`: in its saved dtype, for a caller that needs to know
    it, and then calls `to_compute_dtype` itself); a LoRA adapter folder is `base` loaded with the adapted tensors
    set as peft's merge would write them (rounded to the base's dtype).

    Loaded here rather than by the harness, whose loader needs `accelerate` for device placement.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dppa.io.adapter import is_adapter, open_model

    if is_adapter(path):
        with open_model(path, base) as adapted:  # refuses an adapter without its base
            model, tokenizer = load_model(base, device, upcast=False)
            params = dict(model.named_parameters(remove_duplicate=False))
            for name in adapted.changed():
                if name not in params:
                    raise DppaError(f"{path}: the adapter changes {name!r}, which the loaded model has no parameter of")
                with torch.no_grad():
                    params[name].copy_(adapted.get(name).view(params[name].shape))
        if upcast:
            to_compute_dtype(model)
        return model, tokenizer
    text = str(path)
    if Path(text).exists() and not (Path(text) / "config.json").exists():
        raise DppaError(f"{text}: not a model folder (no config.json)")
    if not Path(text).exists() and (text.startswith((".", "/", "~")) or text.count("/") > 1):
        raise DppaError(f"{text}: no such model folder")
    model = AutoModelForCausalLM.from_pretrained(text, dtype="auto", trust_remote_code=False).to(model_device(device))
    if upcast:
        to_compute_dtype(model)
    return model.eval(), AutoTokenizer.from_pretrained(text, trust_remote_code=False)
