"""Dynamic Pruning on a toy two-layer "model", checked against densities computed by hand."""

import json

import pytest
import torch

from dppa.io.reader import open_checkpoint
from dppa.sparsify.dp import DPOptions, gather_dp_stats, layer_adjustments, module_adjustments, module_densities
from dppa.sparsify.prune import prune_delta
from dppa.sparsify.scope import compile_scope
from tests.helpers.toy_delta import HAND, SCOPE, TOY, write_delta


@pytest.fixture
def toy_delta(tmp_path):
    return write_delta(tmp_path / "toy", TOY)


def test_default_options_are_the_references():
    assert DPOptions() == HAND


def test_statistics_by_hand(toy_delta):
    stats = gather_dp_stats(open_checkpoint(toy_delta), compile_scope(SCOPE), HAND, torch.device("cpu"))
    # layer 0: mean |A_0| = (19 + 30) / 40 = 1.225, threshold 3.675 -> only the 10 is an outlier: 1 / 40
    # layer 1: mean |A_1| = (32 + 39) / 20 = 3.55, threshold 10.65 -> 12, 12, 30: 3 / 20
    assert stats.layer_outlier_pct == pytest.approx({0: 2.5, 1: 15.0})
    # module means 1.9, 1, 3.2, 3.9 -> thresholds 9.5, 5, 16, 19.5 -> one outlier in 0.a and in 1.b
    assert stats.unit_outlier_pct == pytest.approx(
        {"layers.0.a.weight": 10.0, "layers.0.b.weight": 0.0, "layers.1.a.weight": 0.0, "layers.1.b.weight": 10.0}
    )
    assert "norm.weight" not in stats.layer


def test_densities_by_hand(toy_delta):
    stats = gather_dp_stats(open_checkpoint(toy_delta), compile_scope(SCOPE), HAND, torch.device("cpu"))
    # r = [2.5, 15] - 8.75 = [-6.25, 6.25] -> scaled to [-0.08, 0.08]
    assert layer_adjustments(stats.layer_outlier_pct, 0.08) == pytest.approx({0: -0.08, 1: 0.08})
    # u / mean(u) = [2, 0, 0, 2]; size-weighted mean = (20 + 20) / 60 = 2/3 -> [4/3, -2/3, -2/3, 4/3] -> x 0.08 / (4/3)
    assert module_adjustments(stats.unit_outlier_pct, stats.numel, 0.08) == pytest.approx(
        {"layers.0.a.weight": 0.08, "layers.0.b.weight": -0.04, "layers.1.a.weight": -0.04, "layers.1.b.weight": 0.08}
    )
    rho = module_densities(stats, 0.5, 0.08)
    assert rho == pytest.approx(
        {"layers.0.a.weight": 0.5, "layers.0.b.weight": 0.38, "layers.1.a.weight": 0.54, "layers.1.b.weight": 0.66}
    )


def test_dp_prune_keeps_hand_computed_counts(toy_delta, tmp_path):
    out = prune_delta(
        toy_delta, tmp_path / "pruned", method="dp", density=0.5, scope=SCOPE, options=HAND, progress=False
    )
    reader = open_checkpoint(out)
    kept = {n: int(torch.count_nonzero(reader.get(n))) for n in TOY}
    # round(0.5 * 10), round(0.38 * 30), round(0.54 * 10), round(0.66 * 10); out of scope untouched
    assert kept == {
        "layers.0.a.weight": 5,
        "layers.0.b.weight": 11,
        "layers.1.a.weight": 5,
        "layers.1.b.weight": 7,
        "norm.weight": 4,
    }
    # the outliers are among the kept entries, with their sign and value unchanged
    assert reader.get("layers.1.b.weight").view(-1)[9] == TOY["layers.1.b.weight"].view(-1)[9]
    assert torch.equal(reader.get("norm.weight"), TOY["norm.weight"])
    manifest = json.loads((out / "dppa_manifest.json").read_text())
    assert manifest["module_density"]["layers.0.b.weight"] == pytest.approx(0.38)
    assert manifest["layer_density"] == pytest.approx({"0": 0.42, "1": 0.58})
    assert (manifest["method"], manifest["lamda"], manifest["layer_mult"], manifest["module_mult"]) == (
        "dp",
        0.08,
        3,
        5,
    )


def test_no_outliers_anywhere_means_no_adjustment():
    assert module_adjustments({"a": 0.0, "b": 0.0}, {"a": 4, "b": 4}, 0.08) == {"a": 0.0, "b": 0.0}
    assert layer_adjustments({0: 1.0, 1: 1.0}, 0.08) == {0: 0.0, 1: 0.0}


def test_densities_are_clamped_to_unit_interval(toy_delta):
    stats = gather_dp_stats(open_checkpoint(toy_delta), compile_scope(SCOPE), HAND, torch.device("cpu"))
    rho = module_densities(stats, 0.95, 0.08)
    assert rho["layers.1.b.weight"] == 1.0 and max(rho.values()) <= 1.0
    assert min(module_densities(stats, 0.05, 0.08).values()) >= 0.0


def test_floor_keeps_every_module_alive(toy_delta):
    stats = gather_dp_stats(open_checkpoint(toy_delta), compile_scope(SCOPE), HAND, torch.device("cpu"))
    # by hand (adjustments of test_densities_by_hand): 0.05 + [-0.08 + 0.08, -0.08 - 0.04, 0.08 - 0.04, 0.08 + 0.08]
    clamped = {
        "layers.0.a.weight": 0.05,
        "layers.0.b.weight": 0.0,
        "layers.1.a.weight": 0.09,
        "layers.1.b.weight": 0.21,
    }
    assert module_densities(stats, 0.05, 0.08) == pytest.approx(clamped)  # 0.b would be -0.07: pruned away
    floored = module_densities(stats, 0.05, 0.08, floor=0.5)
    assert floored == pytest.approx({**clamped, "layers.0.b.weight": 0.025})  # only 0.b is lifted, to d / 2
