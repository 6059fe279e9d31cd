"""The sparse format's decoding kernels (dppa/io/codec.py): the compiled ones (dppa/io/_codec.c) and the numpy ones
give what plain torch and numpy's packbits say, for every element size, density and unaligned range."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dppa.io import codec

IMPLEMENTATIONS = {"numpy": (codec.count_kept_numpy, codec.expand_numpy)}
if codec.COMPILED:
    from dppa.io import _codec

    IMPLEMENTATIONS["compiled"] = (_codec.count_kept, _codec.expand)


def test_the_compiled_kernels_are_built():
    """CI and `make install` build dppa/io/_codec.c; without it sparse reads fall back to numpy, ten times slower."""
    if os.environ.get("DPPA_CODEC") == "python":
        pytest.skip("DPPA_CODEC=python asks for the numpy kernels")
    assert codec.COMPILED, "dppa/io/_codec.c was not built: install a C compiler, then `make install` again"


def case(seed: int, size: int, density: float):
    """A random dense range of `size`-byte elements (rows of bytes), its mask (numpy's packbits, little bit order)
    with bits before and after the range, and its kept values in order."""
    gen = torch.Generator().manual_seed(seed)
    first = int(torch.randint(0, 70, (), generator=gen))
    count = int(torch.randint(0, 700, (), generator=gen))
    keep = torch.rand(first + count + 13, generator=gen) < density
    elements = torch.randint(1, 256, (count, size), generator=gen, dtype=torch.uint8)  # no all-zero element
    in_range = keep[first : first + count]
    dense = torch.where(in_range[:, None], elements, torch.zeros((), dtype=torch.uint8))
    mask = np.packbits(keep.numpy(), bitorder="little")
    return mask, first, count, dense, elements[in_range].contiguous()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("size", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("density", [0.0, 0.03, 0.2, 0.5, 0.97, 1.0])
def test_expand_and_count_match_plain_torch(impl, size, density):
    count_kept, expand = IMPLEMENTATIONS[impl]
    for seed in range(25):
        mask, first, count, dense, values = case(seed, size, density)
        assert count_kept(mask, first, count) == int((dense != 0).any(1).sum())
        out = torch.full((count, size), 0xAB, dtype=torch.uint8)  # every byte is written
        expand(mask, first, values.numpy(), out.numpy(), size)
        assert torch.equal(out, dense), (seed, first, count)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_long_aligned_bfloat16_ranges(impl):
    """The vector path on whole mask bytes (2- and 4-byte elements), as a chunk of a big tensor reads it."""
    count_kept, expand = IMPLEMENTATIONS[impl]
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.bfloat16, torch.float32):
        tensor = torch.randn(1 << 17, generator=gen).to(dtype)
        tensor[torch.rand(tensor.numel(), generator=gen) > 0.2] = 0.0
        keep = tensor != 0
        mask = np.packbits(keep.numpy(), bitorder="little")
        for first, count in [(0, 1 << 17), (1 << 16, 1 << 16), (8, 4096), (4, 4100), (3, 5000)]:
            values = tensor[first : first + count][keep[first : first + count]]
            out = torch.empty(count, dtype=dtype)
            expand(mask, first, values.view(torch.uint8).numpy(), out.view(torch.uint8).numpy(), dtype.itemsize)
            assert torch.equal(out.view(torch.uint8), tensor[first : first + count].view(torch.uint8))
            assert count_kept(mask, first, count) == int(keep[first : first + count].sum())


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_values_that_disagree_with_the_mask_are_refused(impl):
    count_kept, expand = IMPLEMENTATIONS[impl]
    mask, first, count, dense, values = case(3, 2, 0.5)
    assert len(values) > 1
    for wrong in (values[:-1], torch.cat([values, values[:1]])):
        with pytest.raises(ValueError, match="the mask keeps (more|fewer) elements than the"):
            expand(mask, first, wrong.numpy(), torch.empty(count, 2, dtype=torch.uint8).numpy(), 2)
    with pytest.raises(ValueError, match="outside a mask"):
        count_kept(mask, first, 8 * len(mask))
    with pytest.raises(ValueError, match="outside a mask"):
        expand(mask, 8 * len(mask), values[:0].numpy(), torch.empty(1, 2, dtype=torch.uint8).numpy(), 2)


@pytest.mark.skipif(not codec.COMPILED, reason="dppa/io/_codec.c not built")
def test_a_buffer_refused_by_the_compiled_expand_raises_its_error():
    # a non-buffer `values` once returned an uninitialised result (SystemError, or a crash)
    mask = np.zeros(4, np.uint8)
    with pytest.raises(TypeError, match="values: a C-contiguous buffer is needed"):
        _codec.expand(mask, 0, [1, 2], np.zeros(4, np.uint8), 1)
    with pytest.raises(TypeError, match="out: a C-contiguous writable buffer is needed"):
        _codec.expand(mask, 0, np.zeros(0, np.uint8), b"\0\0", 1)


@pytest.mark.skipif(not codec.COMPILED, reason="dppa/io/_codec.c not built")
def test_histogram15_counts_the_magnitude_bits_as_bincount_does():
    gen = torch.Generator().manual_seed(5)
    # bf16 values of both signs, runs of equal values, and a length that is not a multiple of 8
    values = torch.cat([(torch.randn(100_003, generator=gen) * 0.01).bfloat16(), torch.full((77,), -0.5).bfloat16()])
    hist = torch.full((1 << 16,), 3, dtype=torch.int64)  # counts are added to what is there
    _codec.histogram15(values.view(torch.int16).numpy(), hist.numpy())
    expected = torch.bincount(values.view(torch.int16).to(torch.int32) & 0x7FFF, minlength=1 << 16) + 3
    assert torch.equal(hist, expected)
    assert int(hist[: 1 << 15].sum()) == values.numel() + 3 * (1 << 15)


@pytest.mark.skipif(not codec.COMPILED, reason="dppa/io/_codec.c not built")
def test_histogram15_refuses_a_short_histogram():
    with pytest.raises(ValueError, match="at least 32768 int64 counts"):
        _codec.histogram15(np.zeros(4, np.int16), np.zeros(100, np.int64))


def bf16_pair(seed: int, n: int):
    """A bf16 base and fine-tune of n elements: small and large deltas, equal entries (zero deltas), sign flips,
    runs of one delta value (ties at a threshold), infinities and a difference that overflows to infinity."""
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=gen) * 0.02).bfloat16()
    step = torch.randn(n, generator=gen) * torch.where(torch.rand(n, generator=gen) < 0.5, 1e-3, 3e-2)
    finetune = (base.float() + step).bfloat16()
    finetune[:50], finetune[50:90] = base[:50], -base[50:90]
    finetune[90:400] = (base[90:400].float() + 0.0078125).bfloat16()
    finetune[400], base[401] = float("inf"), float("-inf")
    finetune[402], base[402] = 3e38, -3e38
    return finetune, base


def plain_delta(finetune: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    return (finetune.float() - base.float()).bfloat16()


@pytest.mark.skipif(not codec.COMPILED, reason="dppa/io/_codec.c not built")
@pytest.mark.parametrize("n", [1, 511, 512, 100_003])
def test_delta_histogram15_counts_the_keys_of_the_float32_difference_rounded_to_bf16(n):
    finetune, base = bf16_pair(n, max(n, 403))
    finetune, base = finetune[:n].clone(), base[:n].clone()
    hist = torch.full((1 << 16,), 2, dtype=torch.int64)
    _codec.delta_histogram15(finetune.view(torch.int16).numpy(), base.view(torch.int16).numpy(), hist.numpy())
    keys = plain_delta(finetune, base).view(torch.int16).to(torch.int32) & 0x7FFF
    assert torch.equal(hist, torch.bincount(keys, minlength=1 << 16) + 2)


@pytest.mark.skipif(not codec.COMPILED, reason="dppa/io/_codec.c not built")
@pytest.mark.parametrize("with_base", [True, False])
def test_trimmed_deltas_keep_keys_above_the_threshold_and_ties_before_the_cutoff(with_base):
    finetune, base = bf16_pair(7, 20_001)
    delta = plain_delta(finetune, base) if with_base else finetune
    keys = delta.view(torch.int16).to(torch.int32) & 0x7FFF
    tie_key = int(keys[300])  # the run of equal deltas: many ties
    index = torch.arange(delta.numel())
    for key, tie_end in [(tie_key, 0), (tie_key, 250), (tie_key, 20_001), (tie_key, 10**9), (-1, 0), (0x7FFFFFFF, 0)]:
        out = torch.full((delta.numel(),), 9.0)
        base_bits = base.view(torch.int16).numpy() if with_base else None
        _codec.trimmed_deltas(finetune.view(torch.int16).numpy(), base_bits, key, tie_end, out.numpy())
        keep = (keys > key) | ((keys == key) & (index < tie_end))
        expected = torch.where(keep, delta.float(), torch.zeros(()))
        assert torch.equal(out.view(torch.int32), expected.view(torch.int32)), (key, tie_end)  # -0.0 kept as -0.0


@pytest.mark.skipif(not codec.COMPILED, reason="dppa/io/_codec.c not built")
def test_the_bf16_kernels_refuse_buffers_of_other_lengths():
    two, three = np.zeros(2, np.int16), np.zeros(3, np.int16)
    with pytest.raises(ValueError, match="equal length"):
        _codec.delta_histogram15(two, three, np.zeros(1 << 15, np.int64))
    with pytest.raises(ValueError, match="32768 int64 counts"):
        _codec.delta_histogram15(two, two, np.zeros(100, np.int64))
    with pytest.raises(ValueError, match="4 per element"):
        _codec.trimmed_deltas(two, None, 0, 0, np.zeros(3, np.float32))
