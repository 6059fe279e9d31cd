"""Each private name of lm-eval that dppa/evaluation/lm_eval_private.py relies on exists in the installed lm-eval,
with the shape the module uses; a failure names the one an lm-eval release changed."""

import inspect
from importlib.metadata import version

from dppa.evaluation import lm_eval_private

RELEASE = f"lm-eval {version('lm_eval')}"


def test_every_private_name_is_checked_here():
    checked = {
        "lm_eval.evaluator_utils._process_results",
        "(the accumulator _process_results returns)._to_eval_results",
        "lm_eval.api.task.Task._metric_fn_list",
        "lm_eval.models.huggingface.HFLM._model_generate",
        "lm_eval.utils.env.from_string",
    }
    assert set(lm_eval_private.PRIVATE_NAMES) == checked, "a private name was added: give it a test below"


def test_process_results_takes_the_accumulator_and_gives_to_eval_results():
    from lm_eval import evaluator_utils

    assert hasattr(evaluator_utils, "_process_results"), f"{RELEASE} has no evaluator_utils._process_results"
    params = inspect.signature(evaluator_utils._process_results).parameters
    assert {"groups", "bootstrap_iters"} <= set(params), f"{RELEASE}: _process_results takes {list(params)}"
    # an empty accumulator runs the real aggregation and gives the results dict `evaluate` returns
    results = lm_eval_private.aggregate({}, {})
    assert isinstance(results, dict) and "results" in results, f"{RELEASE}: _to_eval_results gave {results!r}"


def test_tasks_keep_their_metric_functions_in_metric_fn_list():
    from lm_eval.api.task import ConfigurableTask

    source = inspect.getsource(ConfigurableTask.__init__)
    assert "_metric_fn_list" in source, f"{RELEASE}: ConfigurableTask no longer sets _metric_fn_list"


def test_hflm_model_generate_takes_the_arguments_used():
    from lm_eval.models.huggingface import HFLM

    assert hasattr(HFLM, "_model_generate"), f"{RELEASE} has no HFLM._model_generate"
    params = set(inspect.signature(HFLM._model_generate).parameters)
    missing = {"context", "max_length", "stop"} - params
    assert not missing, f"{RELEASE}: HFLM._model_generate lacks {sorted(missing)}"


def test_template_environment_is_a_jinja2_environment_with_from_string():
    import jinja2
    from lm_eval import utils

    assert isinstance(getattr(utils, "env", None), jinja2.Environment), f"{RELEASE}: no lm_eval.utils.env"
    lm_eval_private.memoise_template_compile()
    template = utils.env.from_string("{{ x }}+1")
    assert template.render(x=2) == "2+1" and utils.env.from_string("{{ x }}+1") is template


def test_the_rest_of_the_project_reaches_lm_eval_privates_only_through_this_module():
    from pathlib import Path

    root = Path(lm_eval_private.__file__).parent.parent
    privates = ("_process_results", "_to_eval_results", "_metric_fn_list", "_model_generate", "env.from_string")
    for path in root.rglob("*.py"):
        if path.name != "lm_eval_private.py":
            used = [name for name in privates if name in path.read_text()]
            assert not used, f"{path}: uses lm-eval's {used} outside dppa/evaluation/lm_eval_private.py"
