"""The zoo's target check (scripts/check_zoo.py): the judging rules on hand-made numbers, and a run on the tiny zoo."""

import json

import pytest

from dppa.zoo.check import REAL_TARGETS, TARGETS, check_zoo, judge, main, retention


def _result(base=0.1, own=0.9, rel=0.03, kept=(0.8, 0.7, 0.6)):
    tasks = ["zoo_arith", "zoo_facts", "zoo_strings"]
    return {
        "base": {t: base for t in tasks},
        "finetunes": {
            t.removeprefix("zoo_"): {
                "task": t,
                "exact_match": own,
                "base_exact_match": base,
                "relative_delta_linear": rel,
            }
            for t in tasks
        },
        "best": {"scale": 0.7, "retention": sum(kept) / len(kept)},
    }


def test_retention_is_the_mean_share_kept():
    assert retention({"a": 0.4, "b": 1.0}, {"a": 0.8, "b": 1.0}) == pytest.approx(0.75)
    assert retention({"a": 0.4, "b": 0.0}, {"a": 0.8, "b": 0.0}) == pytest.approx(0.25)  # nothing to keep: 0
    assert retention({"a": 0.9, "b": 0.0}, {"a": 0.3, "b": 0.9}) == pytest.approx(0.5)  # a gain is capped at 1


def test_light_targets():
    assert judge(_result(), TARGETS["light"]) == []
    failures = judge(_result(base=0.25, own=0.79, rel=0.051, kept=(0.7, 0.7, 0.69)), TARGETS["light"])
    assert len(failures) == 3 + 3 + 3 + 1  # base on each task, each fine-tune's score and delta, the merge
    assert judge(_result(rel=0.05, own=0.8, base=0.2, kept=(0.7,)), TARGETS["light"]) == []  # bounds hold


def test_heavy_targets():
    assert judge(_result(rel=0.3, kept=(0.3, 0.3, 0.3)), TARGETS["heavy"]) == []
    failures = judge(_result(rel=0.19, kept=(0.3, 0.3, 0.2)), TARGETS["heavy"])
    assert [f for f in failures if "mean|delta|" in f] and [f for f in failures if "task arithmetic" in f]
    assert len(failures) == 4


def test_real_targets_judge_the_gain_over_the_base():
    light = REAL_TARGETS["light"]
    assert judge(_result(base=0.5, own=0.8, rel=0.01, kept=(0.5,)), light) == []  # a base that scores is fine
    failures = judge(_result(base=0.6, own=0.8, rel=0.005, kept=(0.5,)), light)
    assert len(failures) == 3 and all("gains 0.200 over the base" in f for f in failures)


@pytest.mark.slow
def test_check_on_the_tiny_zoo(tiny_zoo, tmp_path, capsys):
    # The tiny zoo is too small to meet the default targets; the check must still measure it and say so.
    result = check_zoo(tiny_zoo, scales=(0.0, 1.0), limit=20, log=lambda _m: None)
    assert set(result["base"]) == {"zoo_arith", "zoo_facts", "zoo_strings"}
    assert [r["scale"] for r in result["merges"]] == [0.0, 1.0]
    assert result["merges"][0]["scores"] == result["base"]  # scale 0 is the base itself
    assert result["best"]["retention"] == max(r["retention"] for r in result["merges"])
    # The relative delta is measured from the weights, independently of the manifest, and agrees with it.
    manifest = json.loads((tiny_zoo / "zoo.json").read_text())
    for domain, entry in result["finetunes"].items():
        assert entry["relative_delta_linear"] == pytest.approx(manifest["domains"][domain]["relative_delta_linear"])
    code = main([str(tiny_zoo), "--scales", "1.0", "--limit", "20", "--json", str(tmp_path / "check.json")])
    out, err = capsys.readouterr()
    written = json.loads((tmp_path / "check.json").read_text())
    assert written["regime"] == "heavy" and "| TA x1.0 (best) |" in out
    assert code == (1 if written["failures"] else 0) and all(f in err for f in written["failures"])
