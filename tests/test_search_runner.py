"""The amplification search end to end on the tiny zoo with the real lm-eval harness: cache, trace, outputs."""

import csv
import json

import pytest
import torch

from dppa.cli import main
from dppa.errors import DppaError
from dppa.evaluation.cache import EvalCache
from dppa.evaluation.scores import primary_scores, score_folder
from dppa.extract import extract_delta
from dppa.io.manifest import read_manifest
from dppa.search.runner import SearchSettings, dense_scores, search_amplification
from dppa.zoo.tasks import data_fingerprint
from tests.helpers.delta_files import load_delta

TASK = "zoo_facts"
LIMIT = 8


@pytest.fixture(scope="module")
def facts_delta(tiny_zoo, tmp_path_factory):
    return extract_delta(
        tiny_zoo / "base", tiny_zoo / "facts", tmp_path_factory.mktemp("search") / "delta", progress=False
    )


@pytest.fixture
def dense_json(tmp_path):
    # A stated dense score for the tests of the search's machinery (cache, trace, outputs), which do not need the
    # candidates to score: at the default bands (0.1, 0.2) the tiny fine-tune's candidates score 0.
    path = tmp_path / "dense.json"
    path.write_text(json.dumps({TASK: {"exact_match": 0.25}}))
    return path


def _search(tiny_zoo, delta, out, dense, cache, **options):
    return search_amplification(
        tiny_zoo / "base",
        delta,
        out,
        tasks=[TASK],
        dense=dense,
        limit=LIMIT,
        cache=cache,
        device="cpu",
        progress=False,
        log=lambda _m: None,
        **options,
    )


@pytest.mark.slow
def test_rerun_with_the_cache_evaluates_no_candidate(tiny_zoo, facts_delta, dense_json, tmp_path, capsys):
    cache = tmp_path / "cache.jsonl"
    first = _search(tiny_zoo, facts_delta, tmp_path / "amp1", dense_json, cache, trace=tmp_path / "t.csv")
    assert first.real_evaluations == first.result.n_evals >= 2
    assert len(EvalCache(cache)) == first.result.n_evals

    code = main(
        [
            "search",
            str(tiny_zoo / "base"),
            str(facts_delta),
            "-o",
            str(tmp_path / "amp2"),
            "--tasks",
            TASK,
            "--dense",
            str(dense_json),
            "--limit",
            str(LIMIT),
            "--cache",
            str(cache),
            "--device",
            "cpu",
            "-q",
        ]
    )
    assert code == 0
    assert f"({0} evaluated, {first.result.n_evals} cached)" in capsys.readouterr().out
    again = read_manifest(tmp_path / "amp2")
    assert again["search"]["real_evaluations"] == 0
    assert again["factors"] == list(first.result.best_factors)
    assert again["content_hash"] == read_manifest(tmp_path / "amp1")["content_hash"]


def _tensors(folder):
    return load_delta(folder)


def expected_amplified(delta_folder, module_density, factors):
    """The amplified delta in plain torch: per tensor, band b keeps the round(rho_b * n) largest |delta| entries
    (rho_b recorded by DP in the manifest), scaled by max(alpha_b..alpha_K); tensors out of DP's scope are scaled by
    the largest factor."""
    table = [max(factors[b:]) for b in range(len(factors))]
    expected = {}
    for name, delta in _tensors(delta_folder).items():
        if name not in module_density:
            expected[name] = delta * max(factors)
            continue
        flat = delta.flatten().float()
        factor = torch.zeros_like(flat)
        for rho, value in reversed(list(zip(module_density[name], table))):  # narrowest band last: it wins
            keep = int(round(rho * flat.numel()))
            factor[torch.topk(flat.abs(), keep).indices] = value
        expected[name] = (flat * factor).reshape(delta.shape).to(delta.dtype)
    return expected


@pytest.mark.slow
def test_the_search_finds_factors_that_beat_its_start(tiny_zoo, facts_delta, tmp_path):
    """On the tiny facts fine-tune, which learned its task, at bands the pruned delta survives (0.5, 0.9), the
    pattern search ends better than where it started; a search that returned its start point fails here. The best
    candidate is scored again as a folder (base + the written amplified delta) against the dense fine-tune."""
    report = _search(
        tiny_zoo,
        facts_delta,
        tmp_path / "amp",
        tiny_zoo / "facts",
        tmp_path / "c.jsonl",
        strategy="pattern",
        budget=4,
        densities=[0.5, 0.9],
    )
    scores = [ev.score for ev in report.result.trace]
    assert report.result.best_score == max(scores) > scores[0]
    # `dppa apply` writes the base's tokenizer and config beside the weights
    assert main(["apply", str(tiny_zoo / "base"), str(tmp_path / "amp"), "-o", str(tmp_path / "model"), "-q"]) == 0
    evaluate = {"split": "validation", "limit": LIMIT, "batch_size": 32, "device": "cpu", "cache": None}
    got = primary_scores(score_folder(tmp_path / "model", [TASK], **evaluate)[0])[TASK]
    dense = primary_scores(score_folder(tiny_zoo / "facts", [TASK], **evaluate)[0])[TASK]
    assert dense > 0 and report.result.best_score == pytest.approx(got / dense)


@pytest.mark.slow
def test_outputs_record_the_search_and_hold_the_amplified_delta(tiny_zoo, facts_delta, dense_json, tmp_path):
    trace = tmp_path / "plots" / "facts.csv"
    report = _search(
        tiny_zoo,
        facts_delta,
        tmp_path / "amp",
        dense_json,
        tmp_path / "c.jsonl",
        trace=trace,
        strategy="pattern",
        budget=3,
    )
    assert report.result.n_evals == 3 and report.result.stop_reason == "budget"
    manifest = read_manifest(tmp_path / "amp")
    assert manifest["kind"] == "amplified" and manifest["densities"] == [0.1, 0.2]
    assert manifest["factors"] == list(report.result.best_factors)
    assert manifest["search"]["strategy"] == "pattern"
    written = _tensors(tmp_path / "amp")
    expected = expected_amplified(facts_delta, manifest["module_density"], manifest["factors"])
    assert set(written) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(written[name], value, rtol=0, atol=0, msg=name)
    # DP gave each in-scope tensor its own densities, and the bands are nested.
    assert all(0 <= a <= b <= 1 for a, b in manifest["module_density"].values())

    rows = list(csv.DictReader(trace.open()))
    assert [float(r["alpha_1"]) for r in rows] == [ev.factors[0] for ev in report.result.trace]
    assert all(r["cached"] == "False" and float(r["evaluate_s"]) > 0 for r in rows)
    assert (tmp_path / "amp" / "search_trace.csv").read_text() == trace.read_text()
    assert len(json.loads(trace.with_suffix(".json").read_text())["timing"]["candidates"]) == 3


@pytest.mark.slow
def test_three_bands_are_searched_and_written(tiny_zoo, facts_delta, dense_json, tmp_path):
    # The search used to start every strategy at two factors, whatever the number of bands.
    report = _search(
        tiny_zoo,
        facts_delta,
        tmp_path / "amp",
        dense_json,
        tmp_path / "c.jsonl",
        densities=[0.05, 0.1, 0.2],
        budget=4,
    )
    assert report.result.trace[0].factors == (1.8, 0.0, 0.0)
    assert all(len(ev.factors) == 3 for ev in report.result.trace)
    manifest = read_manifest(tmp_path / "amp")
    assert manifest["densities"] == [0.05, 0.1, 0.2] and len(manifest["factors"]) == 3
    written = _tensors(tmp_path / "amp")
    expected = expected_amplified(facts_delta, manifest["module_density"], manifest["factors"])
    for name, value in expected.items():
        torch.testing.assert_close(written[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_the_dense_finetune_is_evaluated_once(tiny_zoo, facts_delta, tmp_path):
    settings = SearchSettings(tasks=(TASK,), limit=LIMIT)
    manifest = read_manifest(facts_delta)
    first = dense_scores(tiny_zoo / "facts", manifest, settings, tmp_path / "c.jsonl", "cpu")
    second = dense_scores(tiny_zoo / "facts", manifest, settings, tmp_path / "c.jsonl", "cpu")
    assert (first[2], second[2]) == ("evaluated", "cache")
    assert first[0] == second[0] and set(first[0]) == {TASK}
    assert first[1] == manifest["finetuned"]["content_hash"]
    # The key the evaluate stage shares records the version of the zoo's task data.
    (record,) = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert json.dumps(data_fingerprint()) in json.dumps(record["fields"])


@pytest.mark.slow  # the tiny zoo (about a minute to build)
def test_test_split_and_existing_output_are_refused_before_work(tiny_zoo, facts_delta, dense_json, tmp_path):
    with pytest.raises(DppaError, match="validation"):
        _search(tiny_zoo, facts_delta, tmp_path / "amp", dense_json, tmp_path / "c.jsonl", split="test")
    (tmp_path / "taken").mkdir()
    with pytest.raises(DppaError, match="already exists"):
        _search(tiny_zoo, facts_delta, tmp_path / "taken", dense_json, tmp_path / "c.jsonl")
    with pytest.raises(DppaError, match="not a delta"):
        _search(tiny_zoo, tiny_zoo / "facts", tmp_path / "amp", dense_json, tmp_path / "c.jsonl")
    assert not (tmp_path / "c.jsonl").exists()


@pytest.mark.slow  # the tiny zoo (about a minute to build)
def test_dense_scores_file_must_cover_the_tasks(tiny_zoo, facts_delta, tmp_path):
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"zoo_arith": 0.5}))
    with pytest.raises(DppaError, match=TASK):
        _search(tiny_zoo, facts_delta, tmp_path / "amp", path, tmp_path / "c.jsonl")


@pytest.mark.slow
def test_each_candidate_scores_as_the_harness_scores_it_written_out(
    tiny_zoo, facts_delta, dense_json, tmp_path, monkeypatch
):
    # The search sets each candidate's weights in memory and scores it with requests prepared once; what it must equal
    # is the candidate written out by the folder route (amplify, then apply) and scored by lm-eval's own evaluation
    # loop with freshly loaded tasks, as before the search prepared anything. The tiny zoo's fine-tunes score 0
    # on exact match, so each candidate's answers are compared as well.
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dppa.evaluation.harness import Evaluator, load_tasks, metrics_from_results
    from dppa.merging.merge import apply_delta
    from dppa.sparsify.bands import amplify_delta

    answers = []  # each scored candidate's answers, in document order
    scores_of = Evaluator.scores

    def scores_and_answers(evaluator):
        scores = scores_of(evaluator)
        answers.append([i.filtered_resps["none"] for _, _, insts in evaluator.prepared.docs[TASK] for i in insts])
        return scores

    monkeypatch.setattr(Evaluator, "scores", scores_and_answers)
    report = _search(
        tiny_zoo, facts_delta, tmp_path / "amp", dense_json, tmp_path / "c.jsonl", strategy="pattern", budget=4
    )
    assert len(report.candidate_scores) == len(answers) == 4
    assert len({json.dumps(a) for a in answers}) > 1  # the factors change the answers
    for n, (factors, scores) in enumerate(report.candidate_scores.items()):
        amplified = amplify_delta(facts_delta, tmp_path / f"a{n}", densities=[0.1, 0.2], factors=list(factors),
                                  progress=False)  # fmt: skip
        folder = apply_delta(tiny_zoo / "base", amplified, tmp_path / f"m{n}", progress=False)
        model = AutoModelForCausalLM.from_pretrained(folder)
        lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(folder), batch_size=32)
        results = evaluate(lm=lm, task_dict=load_tasks([TASK], "validation"), limit=LIMIT, bootstrap_iters=0)
        assert scores == metrics_from_results(results), factors
        expected = [s["filtered_resps"][0] for s in sorted(results["samples"][TASK], key=lambda s: s["doc_id"])]
        assert answers[n] == expected, factors
