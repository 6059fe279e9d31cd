import pytest
import torch

from dppa.sparsify.bands import amplify_delta, amplify_tensor, band_factors, band_index, compute_bands
from dppa.errors import DppaError
from dppa.io.reader import open_checkpoint
from dppa.sparsify.threshold import keep_count
from tests.test_dp import SCOPE, TOY, write_delta


def test_band_factors_follow_the_reference_rule():
    assert band_factors([1.8, 1.0]) == [1.8, 1.0]
    assert band_factors([0.5, 1.2]) == [1.2, 1.2]  # band A gets max(alpha_A, alpha_B)
    assert band_factors([0.5, 1.2], "band") == [0.5, 1.2]
    assert band_factors([1.0, 2.0, 0.5]) == [2.0, 2.0, 0.5]


def test_amplify_tensor_scales_each_band():
    delta = torch.tensor([4.0, -3.0, 2.0, -1.0, 0.5])
    index = band_index(delta, [1, 3])  # band 1: the largest entry; band 2: the next two
    assert index.tolist() == [1, 2, 2, 0, 0]
    assert amplify_tensor(delta, index, [1.8, 1.0]).tolist() == pytest.approx([7.2, -3.0, 2.0, 0.0, 0.0])
    assert amplify_tensor(delta, index, [0.5, 1.5]).tolist() == pytest.approx([6.0, -4.5, 3.0, 0.0, 0.0])
    assert amplify_tensor(delta, None, [0.5, 1.5]).tolist() == pytest.approx([6.0, -4.5, 3.0, -1.5, 0.75])


def test_amplify_delta_matches_bands_of_dp(tmp_path):
    delta = write_delta(tmp_path / "toy", TOY)
    out = amplify_delta(delta, tmp_path / "amp", densities=[0.2, 0.5], factors=[2.0, 1.0], scope=SCOPE,
                        progress=False)
    reader = open_checkpoint(out)
    bands, plan = compute_bands(delta, [0.2, 0.5], scope=SCOPE)
    for name, (values, index) in bands.items():
        assert torch.equal(reader.get(name), amplify_tensor(values, index, [2.0, 1.0]))
    # layers.0.b's DP density is d - 0.08 - 0.04 (test_dp), so 0.08 and 0.38 for the two bands
    assert plan.keep_counts["layers.0.b.weight"] == [keep_count(0.08, 30), keep_count(0.38, 30)]
    amplified = reader.get("layers.1.b.weight").view(-1)
    assert amplified[9] == -60.0  # the outlier (-30) is in band 1 -> 2 x -30
    assert torch.equal(reader.get("norm.weight"), TOY["norm.weight"] * 2.0)


def test_bad_band_specs(tmp_path):
    delta = write_delta(tmp_path / "toy", TOY)
    with pytest.raises(DppaError, match="strictly increasing"):
        amplify_delta(delta, tmp_path / "x", densities=[0.2, 0.1], factors=[1, 1], scope=SCOPE, progress=False)
    with pytest.raises(DppaError, match="one factor per density"):
        amplify_delta(delta, tmp_path / "x", densities=[0.1, 0.2], factors=[1.0], scope=SCOPE, progress=False)
    assert not (tmp_path / "x").exists()
