"""Hub download rules and the report's tables and plots (no network, no models)."""

import json
import math

import pytest

from dppa.errors import DppaError
from dppa.evaluation.report import NORMALISED, scores_table, summary, write_report
from dppa.pipeline.hub import PICKLE_PATTERNS, SAFE_PATTERNS, allow_patterns, ensure_model_folder, record_local


def test_safetensors_repositories_download_no_pickles():
    files = ["config.json", "model-00001-of-00002.safetensors", "pytorch_model.bin", "tokenizer.json"]
    patterns = allow_patterns(files, repo_id="org/model")
    assert patterns == SAFE_PATTERNS
    assert not set(PICKLE_PATTERNS) & set(patterns)


def test_pickle_only_repositories_are_refused_unless_allowed():
    files = ["config.json", "pytorch_model.bin"]
    with pytest.raises(DppaError, match="org/old: only pickled weights"):
        allow_patterns(files, repo_id="org/old")
    assert "*.bin" in allow_patterns(files, allow_pickle=True, repo_id="org/old")


def test_repositories_without_weights_are_refused():
    with pytest.raises(DppaError, match="no weight files"):
        allow_patterns(["README.md", "config.json"], repo_id="org/empty")


def test_local_record_points_at_the_folder(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    record_local("local", str(model), model, tmp_path / "fetched")
    assert ensure_model_folder(tmp_path / "fetched") == model
    with pytest.raises(DppaError, match="not a model folder"):
        record_local("local", "elsewhere", tmp_path, tmp_path / "fetched2")


SCORES = {
    "split": "test",
    "limit": 10,
    "tasks": ["t_a", "t_b"],
    "finetunes": {"a": ["t_a"], "b": ["t_b"]},
    "models": {
        "base": {"t_a": {"exact_match": 0.1, "exact_match_stderr": 0.01}, "t_b": {"exact_match": 0.0}},
        "a": {"t_a": {"exact_match": 0.8}, "t_b": {"exact_match": 0.1}},
        "b": {"t_a": {"exact_match": 0.2}, "t_b": {"exact_match": 0.5}},
        "merged": {"t_a": {"exact_match": 0.4}, "t_b": {"exact_match": 0.5}},
    },
}


def test_table_normalises_by_the_finetune_that_owns_each_task():
    table = scores_table(SCORES)
    assert list(table.index) == ["base", "a", "b", "merged"]
    assert table.loc["merged", "mean"] == pytest.approx(0.45)
    # merged: 0.4 / 0.8 on t_a (owned by a), 0.5 / 0.5 on t_b (owned by b)
    # the geometric mean of the ratios (dppa.evaluation.objective), by hand
    assert table.loc["merged", NORMALISED] == pytest.approx(math.sqrt(0.5 * 1.0))
    assert summary(table)["a"]["normalised"] == pytest.approx(math.sqrt(1.0 * 0.2))


def test_report_writes_tables_plots_and_summary(tmp_path):
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps(SCORES))
    traces = tmp_path / "traces"
    traces.mkdir()
    (traces / "a.csv").write_text(
        "index,alpha_1,alpha_2,score,accepted,best_score\n0,1.8,0.0,0.9,True,0.9\n1,1.9,0.0,0.95,True,0.95\n"
    )
    (traces / "b.csv").write_text("index,score,best_score\n")  # fixed factors: nothing searched
    table = write_report(scores, traces, tmp_path / "report", tmp_path / "summary.json")
    files = {p.name for p in (tmp_path / "report").iterdir()}
    assert files == {"scores.csv", "scores.md", "scores.png", "search.png"}
    assert "| merged" in (tmp_path / "report" / "scores.md").read_text()
    assert (tmp_path / "report" / "search.png").stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text())["merged"]["mean"] == pytest.approx(0.45)
    assert table.shape == (4, 4)
