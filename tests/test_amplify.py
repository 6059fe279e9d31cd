import pytest
import torch

from dppa.errors import DppaError
from dppa.io.reader import open_checkpoint
from dppa.sparsify.bands import amplify_delta, amplify_tensor, band_factors, band_index
from tests.helpers.toy_delta import HAND, SCOPE, TOY, write_delta


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


# Entries DP keeps per band on the toy at densities 0.2 and 0.5, by hand: rho_j(d) = d + layer_adj + module_adj with
# the adjustments of test_dp (0.a: +0, 0.b: -0.12, 1.a: +0.04, 1.b: +0.16), then round(rho_j * n_j):
# 0.a: 0.2 * 10 = 2, 0.5 * 10 = 5; 0.b: 0.08 * 30 = 2.4 -> 2, 0.38 * 30 = 11.4 -> 11;
# 1.a: 0.24 * 10 = 2.4 -> 2, 0.54 * 10 = 5.4 -> 5; 1.b: 0.36 * 10 = 3.6 -> 4, 0.66 * 10 = 6.6 -> 7
HAND_KEEP = {
    "layers.0.a.weight": (2, 5),
    "layers.0.b.weight": (2, 11),
    "layers.1.a.weight": (2, 5),
    "layers.1.b.weight": (4, 7),
}


def banded(delta, keep, factors):
    """Plain torch: sort by |delta| (ties to the lowest index), scale the first keep[0] entries by factors[0], the
    next keep[1] - keep[0] by factors[1], zero the rest."""
    flat = delta.flatten()
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    out = torch.zeros_like(flat)
    out[order[: keep[0]]] = flat[order[: keep[0]]] * factors[0]
    out[order[keep[0] : keep[1]]] = flat[order[keep[0] : keep[1]]] * factors[1]
    return out.view_as(delta)


@pytest.mark.parametrize(
    "factors,combine,applied",
    [([2.0, 1.0], "max", [2.0, 1.0]), ([0.5, 1.5], "max", [1.5, 1.5]), ([0.5, 1.5], "band", [0.5, 1.5])],
)
def test_amplify_delta_equals_hand_computed_bands(tmp_path, factors, combine, applied):
    delta = write_delta(tmp_path / "toy", TOY)
    out = amplify_delta(
        delta,
        tmp_path / "amp",
        densities=[0.2, 0.5],
        factors=factors,
        combine=combine,
        scope=SCOPE,
        options=HAND,
        progress=False,
    )
    reader = open_checkpoint(out)
    for name, keep in HAND_KEEP.items():
        assert torch.equal(reader.get(name), banded(TOY[name], keep, applied)), name
    # out of scope: the whole delta times max(alpha)
    assert torch.equal(reader.get("norm.weight"), TOY["norm.weight"] * max(factors))
    if factors == [2.0, 1.0]:
        assert reader.get("layers.1.b.weight").view(-1)[9] == -60.0  # the outlier -30 is in band 1


def test_bad_band_specs(tmp_path):
    delta = write_delta(tmp_path / "toy", TOY)
    with pytest.raises(DppaError, match="strictly increasing"):
        amplify_delta(delta, tmp_path / "x", densities=[0.2, 0.1], factors=[1, 1], scope=SCOPE, progress=False)
    with pytest.raises(DppaError, match="one factor per density"):
        amplify_delta(delta, tmp_path / "x", densities=[0.1, 0.2], factors=[1.0], scope=SCOPE, progress=False)
    assert not (tmp_path / "x").exists()
