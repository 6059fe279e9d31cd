"""`merge.weights: search`: the merge scale and per-fine-tune weights chosen on the validation split. The trace's
best candidate is checked against a merge computed by hand (plain torch on the state dicts) and scored from its
own folder by lm-eval, not against the search's in-memory candidates."""

import math

import pytest

from dppa.cli import main
from dppa.evaluation.scores import primary_scores, score_folder
from dppa.search.merge_search import search_merge
from tests.helpers.merge import expected_merge

FINETUNES = ("facts", "strings")  # both learned their tasks in the tiny zoo


@pytest.mark.slow
def test_weights_and_scale_search_picks_the_best_candidate(tiny_zoo, tmp_path):
    deltas = []
    for name in FINETUNES:
        assert main(["extract", str(tiny_zoo / "base"), str(tiny_zoo / name), "-o", str(tmp_path / name), "-q"]) == 0
        deltas.append(tmp_path / name)
    tasks = {n: [f"zoo_{n}"] for n in FINETUNES}
    evaluate = {"split": "validation", "limit": 8, "batch_size": 8}
    scale, weights, result, columns = search_merge(
        tiny_zoo / "base",
        deltas,
        {n: tiny_zoo / n for n in FINETUNES},
        tasks,
        method="task_arithmetic",
        weights=None,
        density=None,
        grid=[0.5, 1.0],
        weight_grid=[0.5, 2.0],
        device="cpu",
        cache=tmp_path / "cache.jsonl",
        work=tmp_path / "work",
        **evaluate,
    )
    assert columns == ["scale", "weight_facts", "weight_strings"]
    rows = [(r["scale"], r["weight_facts"], r["weight_strings"], r["score"]) for r in result.trace_rows(columns)]
    # the order of the search: the scale grid at weights 1, then each fine-tune's weight in turn, then the scales
    # again for the chosen weights (candidates already scored are not repeated)
    assert [r[:3] for r in rows[:2]] == [(0.5, 1.0, 1.0), (1.0, 1.0, 1.0)]
    first_scale = max(rows[:2], key=lambda r: r[3])[0]
    assert [r[:2] for r in rows[2:4]] == [(first_scale, 0.5), (first_scale, 2.0)]
    assert len({r[:3] for r in rows}) == len(rows)
    best = max(rows, key=lambda r: r[3])  # the first best in search order
    assert (scale, *weights) == best[:3] and result.best_score == best[3]
    assert best[3] > rows[0][3]  # the search ends better than its start: one that returned the start fails here
    assert not (tmp_path / "work").exists()

    # by hand: base + scale * sum(w_i * delta_i), scored from a folder, normalised by the dense fine-tunes
    merged = expected_merge(
        tiny_zoo / "base", [tiny_zoo / n for n in FINETUNES], "task_arithmetic", None, scale, weights
    )
    folder = tmp_path / "by-hand"
    merged.save_pretrained(folder)
    for file in (tiny_zoo / "base").iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            (folder / file.name).write_bytes(file.read_bytes())
    ratios, raw = [], []
    for name in FINETUNES:
        own = tasks[name]
        dense = primary_scores(score_folder(tiny_zoo / name, own, device="cpu", cache=None, **evaluate)[0])
        got = primary_scores(score_folder(folder, own, device="cpu", cache=None, **evaluate)[0])
        ratios += [got[t] / dense[t] for t in own if dense[t] > 0]
        raw += [got[t] for t in own]
    # the objective: the geometric mean of the ratios over the tasks a dense fine-tune scores above 0 on; with none,
    # the geometric mean of the raw scores (dppa.evaluation.objective's zero rule)
    values = ratios or raw
    expected = math.prod(values) ** (1 / len(values)) if min(values) > 0 else 0.0
    assert best[3] == pytest.approx(expected, abs=1e-6)
