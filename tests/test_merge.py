import hashlib

import pytest
import torch

from dppa.merging.task_arithmetic import task_arithmetic
from dppa.merging.ties import ties_combine, ties_merge
from dppa.sparsify.dare import dare_prune


def test_ties_sign_election_and_disjoint_mean():
    deltas = torch.tensor([[1.0, -2.0, 3.0, 0.0], [2.0, 1.0, -4.0, 0.0], [-1.0, 1.0, 2.0, 5.0]])
    # sums [2, 0, 1, 5] -> signs [+, 0, +, +]; means of agreeing nonzero entries
    assert ties_combine(list(deltas.clone()), [1.0, 1.0, 1.0]).tolist() == [1.5, 0.0, 2.5, 5.0]
    weights = [1.0, 2.0, 1.0]
    weighted = [d * w for d, w in zip(deltas, weights)]  # sums [4, 1, -3, 5]
    assert ties_combine(weighted, weights).tolist() == pytest.approx([5 / 3, 1.0, -4.0, 5.0])


def test_ties_merge_scales_and_adds_base():
    base = torch.tensor([10.0, 10.0])
    merged = ties_merge(base.clone(), [torch.tensor([1.0, -1.0]), torch.tensor([3.0, 1.0])], [1.0, 1.0], 0.5)
    # position 0: mean(1, 3) = 2 -> 10 + 0.5 * 2; position 1: sum 0 -> no sign -> 0
    assert merged.tolist() == [11.0, 10.0]
    ta = task_arithmetic(base.clone(), [torch.tensor([1.0, -1.0]), torch.tensor([3.0, 1.0])], [1.0, 2.0], 0.5)
    assert ta.tolist() == [13.5, 10.5]


def test_dare_rescales_and_is_reproducible():
    delta = torch.ones(100_000)
    pruned = dare_prune(delta, 0.25, seed=7, name="w")
    kept = pruned[pruned != 0]
    assert torch.all(kept == 4.0)  # 1 / (1 - p) with p = 0.75
    assert abs(kept.numel() / delta.numel() - 0.25) < 0.01
    assert torch.equal(pruned, dare_prune(delta, 0.25, seed=7, name="w"))
    assert not torch.equal(pruned, dare_prune(delta, 0.25, seed=8, name="w"))
    assert not torch.equal(pruned, dare_prune(delta, 0.25, seed=7, name="other"))


def test_dare_is_identical_bit_for_bit_to_a_recorded_digest():
    # The draw uses torch's CPU generator seeded from sha256(seed:name), so any machine gives these bytes.
    pruned = dare_prune(torch.linspace(-1, 1, 4096), 0.3, seed=1234, name="model.layers.0.mlp.up_proj.weight")
    digest = hashlib.sha256(pruned.numpy().tobytes()).hexdigest()
    assert digest == DARE_DIGEST


DARE_DIGEST = "c9cc844a9875bf7fdb43c1a7725c611a81aba3f6293599609a90e47019c02104"  # torch CPU generator (mt19937)


def test_ties_with_a_negative_and_a_zero_weight():
    # weighted deltas (weights 1, -1, 0): sums [1, -4, 0] elect signs [+, -, 0]. Entry 0: only the first agrees,
    # 2 / 1. Entry 1: both agree, |-1| + |-3| = 4 over a weight sum of 1 + (-1) = 0, which counts as 1: -4.
    weighted = [torch.tensor([2.0, -1.0, 0.0]), torch.tensor([-1.0, -3.0, 0.0]), torch.tensor([0.0, 0.0, 0.0])]
    assert ties_combine(weighted, [1.0, -1.0, 0.0]).tolist() == [2.0, -4.0, 0.0]
