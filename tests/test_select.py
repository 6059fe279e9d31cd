import pytest
import torch

from dppa.sparsify.threshold import find_threshold, keep_count, key_bits, magnitude_keys, topk_mask


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_threshold_equals_the_kth_largest_magnitude(dtype):
    gen = torch.Generator().manual_seed(0)
    values = (torch.randn(300_000, generator=gen) * torch.rand(300_000, generator=gen).pow(4)).to(dtype)
    magnitude = values.float().abs()
    for density in (0.001, 0.2, 0.5, 0.99):
        k = keep_count(density, values.numel())
        expected = torch.kthvalue(magnitude, values.numel() - k + 1).values
        mask = topk_mask(values.abs(), k)
        assert int(mask.sum()) == k
        assert magnitude[mask].min() == expected
        assert bool((magnitude[~mask] <= expected).all())


def test_chunked_threshold_equals_whole_tensor_threshold():
    values = torch.randn(100_000).bfloat16()  # many ties at the threshold
    keys = magnitude_keys(values)
    whole = find_threshold(lambda: [keys], keys.numel(), 20_000, key_bits(values.dtype))
    chunked = find_threshold(lambda: keys.split(7_777), keys.numel(), 20_000, key_bits(values.dtype))
    assert whole == chunked
    mask = torch.cat([chunked.mask(c, start) for start, c in zip(range(0, 100_000, 7_777), keys.split(7_777))])
    assert int(mask.sum()) == 20_000 and torch.equal(mask, whole.mask(keys))


def test_keep_count_rounds_and_clamps():
    assert keep_count(0.38, 30) == 11
    assert keep_count(0.66, 10) == 7
    assert keep_count(1.0, 10) == 10 and keep_count(0.0, 10) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [0, 1, 700, 2500, 4000])
@pytest.mark.parametrize("random_access,group", [(False, None), (True, None), (True, 2000)])
def test_keep_in_zeroes_all_but_the_k_largest_chunk_by_chunk(dtype, k, random_access, group, monkeypatch):
    if group:  # histograms kept per 2 chunks of 1500, so the cutoff is placed inside one of two groups
        monkeypatch.setattr("dppa.sparsify.threshold.TIE_GROUP_ELEMS", group)
    gen = torch.Generator().manual_seed(3)
    values = (torch.randn(4000, generator=gen) * 3).round().to(dtype)  # many ties at every magnitude
    values[::9] = 0.0
    flat = values.float()
    # reference: a stable sort by magnitude, ties to the lowest index
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[:k]
    expected = torch.zeros_like(flat)
    expected[order] = flat[order]
    pieces = values.split(1500)
    chunk_at = (lambda i: magnitude_keys(pieces[i])) if random_access else None
    threshold = find_threshold(lambda: map(magnitude_keys, pieces), values.numel(), k, key_bits(dtype), chunk_at)
    got = torch.cat(
        [threshold.keep_in_(p.float(), magnitude_keys(p), start) for start, p in zip(range(0, 4000, 1500), pieces)]
    )
    assert torch.equal(got, expected)
    assert int((got != 0).sum()) == int((expected != 0).sum())
