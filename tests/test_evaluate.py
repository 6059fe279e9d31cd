"""Evaluation through the real lm-evaluation-harness on the tiny zoo: folders, in-memory models, base + delta."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dppa.cli import main
from dppa.errors import DppaError
from dppa.evaluation.harness import (
    Evaluator,
    evaluate_folder,
    evaluate_model,
    load_tasks,
    metrics_from_results,
)
from dppa.evaluation.weights import CandidateWeights
from dppa.zoo.domains import domain_splits

TASKS = ["zoo_arith", "zoo_strings"]


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.slow
def test_folder_and_in_memory_scores_are_identical(tiny_zoo):
    from_folder = evaluate_folder(tiny_zoo / "strings", TASKS, split="validation", limit=16, device="cpu")
    model, tok = _load(tiny_zoo / "strings")
    in_memory = evaluate_model(model, tok, TASKS, split="validation", limit=16)
    assert set(from_folder) == set(TASKS)
    assert 0.0 <= from_folder["zoo_arith"]["exact_match"] <= 1.0
    assert from_folder == in_memory


def _write_delta(base, finetuned, folder):
    folder.mkdir()
    finetuned_params = dict(finetuned.named_parameters())
    tensors = {n: (finetuned_params[n] - p).detach().contiguous() for n, p in base.named_parameters()}
    save_file(tensors, folder / "model.safetensors")
    return folder


@pytest.mark.slow
def test_base_plus_delta_in_memory_matches_the_finetune(tiny_zoo, tmp_path):
    base, tok = _load(tiny_zoo / "base")
    finetuned, _ = _load(tiny_zoo / "facts")
    delta = _write_delta(base, finetuned, tmp_path / "delta")
    CandidateWeights(base).add_delta(delta)
    for name, param in finetuned.named_parameters():
        torch.testing.assert_close(base.get_parameter(name), param)
    rebuilt = evaluate_model(base, tok, ["zoo_facts"], split="test", limit=16)
    assert rebuilt == evaluate_model(finetuned, tok, ["zoo_facts"], split="test", limit=16)


@pytest.mark.slow
def test_one_evaluator_rescores_changed_weights_like_a_fresh_evaluation(tiny_zoo):
    # The search reuses one Evaluator while the weights change: each call must see the current weights and give
    # what a fresh evaluation (new harness wrapper, freshly loaded tasks) gives.
    base, tok = _load(tiny_zoo / "base")
    tasks = ["zoo_facts"]  # the tiny zoo's facts fine-tune learned its task; the base scores 0 on it
    evaluator = Evaluator(base, tok, tasks, split="validation", limit=16)
    weights = CandidateWeights(base)
    first = evaluator.scores()
    weights.load_weights(tiny_zoo / "facts")
    switched = evaluator.scores()
    assert switched["zoo_facts"]["exact_match"] > first["zoo_facts"]["exact_match"]
    facts, _ = _load(tiny_zoo / "facts")
    assert switched == evaluate_model(facts, tok, tasks, split="validation", limit=16)
    weights.restore()
    assert (
        evaluator.scores()
        == first
        == evaluate_model(_load(tiny_zoo / "base")[0], tok, tasks, split="validation", limit=16)
    )


@pytest.mark.parametrize("split", ["validation", "test"])
def test_split_selects_the_documents(split):
    task = load_tasks(["zoo_arith"], split)["tasks"]["zoo_arith"]
    first = next(iter(task.eval_docs))
    assert first["prompt"] == domain_splits("arith")[split][0].prompt


@pytest.mark.slow  # an unknown name makes the harness index all its built-in tasks
def test_unknown_task_and_split_are_user_errors():
    with pytest.raises(DppaError, match="no_such_task"):
        load_tasks(["no_such_task_zz"], "test")
    with pytest.raises(DppaError, match="split"):
        load_tasks(["zoo_arith"], "train")


def test_metrics_table():
    harness_row = {"alias": "zoo_arith", "exact_match,none": 0.25, "exact_match_stderr,none": "N/A", "sample_len": 8}
    results = {"results": {"zoo_arith": harness_row}}
    table = metrics_from_results(results)
    assert table == {"zoo_arith": {"exact_match": 0.25}}


@pytest.mark.slow
def test_eval_command_writes_metrics_json(tiny_zoo, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    argv = ["eval", str(tiny_zoo / "arith"), "--tasks", "zoo_arith", "--limit", "8", "--device", "cpu"]
    assert main([*argv, "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert list(metrics) == ["zoo_arith"] and 0.0 <= metrics["zoo_arith"]["exact_match"] <= 1.0
    assert "results" in json.loads(out.with_suffix(".harness.json").read_text())
    assert main([*argv, "--output", str(out)]) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing"), "--tasks", "zoo_arith"]) == 2
