"""The search's evaluator (requests built once, greedy generation by its own loop) against lm-eval's own
`simple_evaluate` on the same model and examples: equal metrics and equal answers, document by document."""

import json

import pytest
import torch
from lm_eval.evaluator import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from transformers import AutoModelForCausalLM, AutoTokenizer

from dppa.evaluation.harness import Evaluator
from dppa.evaluation.weights import CandidateWeights
from dppa.zoo.domains import domain_splits
from dppa.zoo.tasks import ensure_tasks_dir

TASKS = ["zoo_arith", "zoo_facts", "zoo_strings"]
LIMIT = 24


def _harness(model, tokenizer, tasks, include_path):
    """lm-eval's simple_evaluate on the test split (the split it picks for these tasks), with each answer."""
    results = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8),
        tasks=list(tasks),
        task_manager=TaskManager(include_path=[str(p) for p in include_path], include_defaults=False),
        limit=LIMIT,
        bootstrap_iters=0,
        log_samples=True,
    )
    answers = {
        task: [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
        for task, samples in results["samples"].items()
    }
    return results["results"], answers


def _prepared(evaluator):
    results = evaluator.results()["results"]
    answers = {
        task: [[i.filtered_resps["none"] for i in instances] for _, _, instances in docs]
        for task, docs in evaluator.prepared.docs.items()
    }
    return results, answers


def _same_as_harness(evaluator, model, tokenizer, tasks, include_path=()):
    ours = _prepared(evaluator)
    theirs = _harness(model, tokenizer, tasks, [ensure_tasks_dir(), *include_path])
    assert ours[0] == theirs[0]
    assert ours[1] == theirs[1]
    return ours[0]


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.slow
def test_generation_scores_and_answers_equal_simple_evaluate_as_the_weights_change(tiny_zoo):
    model, tokenizer = _load(tiny_zoo / "base")
    evaluator = Evaluator(model, tokenizer, TASKS, split="test", limit=LIMIT, batch_size=8)
    assert evaluator.prepared.generation is not None  # the greedy loop passed its check and is what runs
    weights = CandidateWeights(model)
    seen = set()
    for domain, scale in [("arith", 1.0), ("facts", 0.6), ("strings", 1.4)]:
        weights.towards(tiny_zoo / domain, scale)
        _same_as_harness(evaluator, model, tokenizer, TASKS)
        seen.add(json.dumps(_prepared(evaluator)[1], sort_keys=True))
    assert len(seen) == 3  # the weights changed the answers, and each time both agreed


@pytest.mark.slow
def test_rows_ended_by_eos_are_padded_as_generate_pads_them(tiny_zoo):
    # With the newline as an end-of-sequence token, rows end one by one and generate pads them from then on.
    model, tokenizer = _load(tiny_zoo / "strings")
    newline = tokenizer.encode("\n", add_special_tokens=False)
    model.generation_config.eos_token_id = [*newline, tokenizer.eos_token_id]
    evaluator = Evaluator(model, tokenizer, ["zoo_strings"], split="test", limit=LIMIT, batch_size=8)
    assert evaluator.prepared.generation is not None
    _same_as_harness(evaluator, model, tokenizer, ["zoo_strings"])


@pytest.mark.slow
def test_settings_the_loop_does_not_follow_leave_generation_to_the_harness(tiny_zoo):
    model, tokenizer = _load(tiny_zoo / "arith")
    model.generation_config.repetition_penalty = 1.5
    evaluator = Evaluator(model, tokenizer, ["zoo_arith"], split="test", limit=LIMIT, batch_size=8)
    assert evaluator.prepared.generation is None
    _same_as_harness(evaluator, model, tokenizer, ["zoo_arith"])


@pytest.mark.slow
def test_loglikelihood_task_equals_simple_evaluate(tiny_zoo, tmp_path):
    # A multiple-choice task (log-likelihood requests) on the arithmetic examples: the right sum or one more.
    rows = [
        {"prompt": e.prompt, "choices": [e.answer, str(int(e.answer) + 1)], "label": 0}
        for e in domain_splits("arith")["test"]
    ]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "choice.yaml").write_text(
        "task: dppa_test_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'test.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{prompt}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    model, tokenizer = _load(tiny_zoo / "arith")
    tasks = ["dppa_test_choice"]
    evaluator = Evaluator(model, tokenizer, tasks, split="test", limit=LIMIT, batch_size=8, include_path=[tmp_path])
    results = _same_as_harness(evaluator, model, tokenizer, tasks, [tmp_path])
    assert 0.0 < results["dppa_test_choice"]["acc,none"] <= 1.0
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(0.5)  # other weights, other log-likelihoods: still the harness's numbers
    _same_as_harness(evaluator, model, tokenizer, tasks, [tmp_path])
