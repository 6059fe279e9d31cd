"""Every private name of lm-eval this project relies on, in one module.

lm-eval has no public entry point for these, and a release may rename or drop any of them: tests/test_lm_eval_private
checks each name in PRIVATE_NAMES against the installed lm-eval and names the one that changed.

- `aggregate`: the harness's aggregation of per-document metrics into its results dict, as
  `lm_eval.evaluator.evaluate` runs it after the model (`evaluator_utils._process_results`, then the accumulator's
  `_to_eval_results`). The prepared evaluator (prepared.py) scores a model many times and needs this step alone.
- `metric_names`: a task's metric functions (`Task._metric_fn_list`), to refuse a task whose metric is `bypass`.
- `harness_generate`: the HF wrapper's own generation call (`HFLM._model_generate`), which the prepared evaluator's
  greedy loop is checked against on its first batch.
- `memoise_template_compile`: lm-eval compiles a task's prompt templates again for every document, through its
  module-level jinja2 environment (`lm_eval.utils.env`); its `from_string` is wrapped in a cache once per process.
"""

from __future__ import annotations

import functools

PRIVATE_NAMES = (
    "lm_eval.evaluator_utils._process_results",
    "(the accumulator _process_results returns)._to_eval_results",
    "lm_eval.api.task.Task._metric_fn_list",
    "lm_eval.models.huggingface.HFLM._model_generate",
    "lm_eval.utils.env.from_string",
)


def aggregate(accumulated: dict, groups: dict) -> dict:
    """The harness's results dict (as `evaluate` returns it, without samples) from {task: {"task", "raw_metrics",
    "logged_samples"}}; no bootstrap (no stderr), as nothing here reads one."""
    from lm_eval.evaluator_utils import _process_results

    return _process_results(accumulated, groups, bootstrap_iters=0)._to_eval_results(samples=None)


def metric_names(task) -> set[str]:
    """The names of a task's metric functions (empty when the task keeps none)."""
    return set(getattr(task, "_metric_fn_list", {}))


def harness_generate(lm, **kwargs):
    """The HF wrapper's generation on one batch (context, attention_mask, stop, max_length, generation kwargs)."""
    return lm._model_generate(**kwargs)


def memoise_template_compile() -> None:
    """Cache lm-eval's template compilation: a compiled template is immutable and renders the same text, so the
    cache changes no output (measured: a third of a search candidate's time on the tiny zoo went to compiling)."""
    from lm_eval import utils

    if not hasattr(utils.env.from_string, "cache_info"):
        utils.env.from_string = functools.lru_cache(maxsize=4096)(utils.env.from_string)
