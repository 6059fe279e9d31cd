"""The paper's experiment runner on the tiny zoo: tables, resumability, reuse of artifacts by manifest."""

import csv
import json

import pytest

from dppa.errors import DppaError
from dppa.experiment import ExperimentConfig, load_config, manifest_value, run_experiment


def _config(tiny_zoo, tmp_path, **changes):
    data = {
        "work": tmp_path / "work",
        "results": tmp_path / "results",
        "domains": ["facts", "strings"],
        "regimes": {"heavy": {"zoo": tiny_zoo, "size": "tiny"}},
        "evaluate": {"limit": 4, "batch_size": 8},
        "prune": {"methods": ["dare", "dp"], "densities": [0.2]},
        "dppa": {"search": {"limit": 4, "budget": 2, "compare": ["pattern"]}},
        "merge": {"combos": ["dense+ties", "dppa+ties"]},
    }
    data.update(changes)
    return ExperimentConfig.model_validate(data)


@pytest.mark.slow
def test_tables_then_a_rerun_reuses_everything(tiny_zoo, tmp_path):
    config = _config(tiny_zoo, tmp_path)
    results = run_experiment(config, log=lambda _m: None)
    text = results.read_text()
    assert "DPPA + TIES" in text and "DP 0.2" in text and "Wall time" in text
    rows = list(csv.DictReader((tmp_path / "results" / "heavy_finetunes.csv").open()))
    # per fine-tune: base, dense, 2 methods x 1 density, DPPA with the reference search and with pattern search
    assert [(r["finetune"], r["method"]) for r in rows][:6] == [("facts", "base"), ("facts", "dense"),
                                                              ("facts", "dare"), ("facts", "dp"), ("facts", "dppa"),
                                                              ("facts", "dppa:pattern")]
    assert len(rows) == 12 and all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
    assert "DPPA (pattern) 0.2" in text
    merges = list(csv.DictReader((tmp_path / "results" / "heavy_merges.csv").open()))
    assert {(r["merge"], r["domain"]) for r in merges} == {
        (m, d) for m in ("base", "dense+ties", "dppa+ties") for d in ("facts", "strings")}
    first = json.loads((tmp_path / "results" / "summary.json").read_text())["regimes"]["heavy"]
    assert first["test_evaluations"] == 1 + 2 + 2 * 4 + 2  # base, dense x2, (dare, dp, 2 x dppa) x2, merges x2
    searches = first["searches"]
    assert searches["dppa:pattern/facts"]["n_candidates"] <= searches["dppa/facts"]["n_candidates"]

    built = []
    run_experiment(config, log=built.append)
    assert not [line for line in built if "built" in line or "scored" in line]
    again = json.loads((tmp_path / "results" / "summary.json").read_text())["regimes"]["heavy"]
    assert again["test_evaluations"] == 0
    assert list(csv.DictReader((tmp_path / "results" / "heavy_finetunes.csv").open())) == rows

    # A new DARE seed remakes the DARE deltas only (and rescores them); the rest is taken as done.
    log = []
    run_experiment(_config(tiny_zoo, tmp_path, prune={"methods": ["dare", "dp"], "densities": [0.2], "seed": 1},
                           merge={"combos": ["dense+ties"]}), log=log.append)
    remade = [line for line in log if "built" in line]
    assert remade and all("/pruned/dare-0.2/" in line for line in remade)


def test_manifest_paths_and_config_errors(tmp_path):
    manifest = {"search": {"fingerprint": "f"}, "deltas": [{"content_hash": "a"}, {"content_hash": "b"}]}
    assert manifest_value(manifest, "search.fingerprint") == "f"
    assert manifest_value(manifest, "deltas.*.content_hash") == ["a", "b"]
    assert manifest_value(manifest, "search.missing") is None
    path = tmp_path / "paper.yaml"
    path.write_text("regimes: {heavy: {zoo: z}}\nmerge: {scael: 1}\n")
    with pytest.raises(DppaError, match="merge.scael"):
        load_config(path)
    path.write_text("regimes: {heavy: {zoo: z}}\nmerge: {combos: [dppa+average]}\n")
    with pytest.raises(DppaError, match="dppa\\+average"):
        load_config(path)
    path.write_text("regimes: {heavy: {zoo: z}}\nevaluate: {split: validation}\n")
    with pytest.raises(DppaError, match="evaluate.split"):
        load_config(path)
