import torch

from dppa.select import BRACKET_MIN_NUMEL, keep_count, kth_largest, topk_mask


def test_topk_mask_keeps_exactly_k_with_ties_to_lowest_index():
    values = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.5])
    mask = topk_mask(values, 3)
    assert mask.tolist() == [False, True, True, True, False, False]
    assert topk_mask(values, 0).sum() == 0 and topk_mask(values, 6).all()


def test_topk_masks_are_nested():
    values = torch.randn(10_000).abs().bfloat16().float()  # bf16 rounding creates many ties
    smaller, larger = topk_mask(values, 1000), topk_mask(values, 2000)
    assert int(smaller.sum()) == 1000 and int(larger.sum()) == 2000
    assert bool((smaller & ~larger).sum() == 0)


def test_bracketed_selection_equals_full_kthvalue():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(BRACKET_MIN_NUMEL * 2, generator=gen).abs()
    for density in (0.01, 0.2, 0.5, 0.99):
        k = keep_count(density, values.numel())
        expected = torch.kthvalue(values, values.numel() - k + 1).values
        assert kth_largest(values, k) == expected
        assert int(topk_mask(values, k).sum()) == k


def test_keep_count_rounds_and_clamps():
    assert keep_count(0.38, 30) == 11
    assert keep_count(0.66, 10) == 7
    assert keep_count(1.0, 10) == 10 and keep_count(0.0, 10) == 0
