"""The pipeline's in-memory candidates (each fine-tune alone, merges at several scales) against plain torch."""

import pytest
import torch
from safetensors.torch import load_file

from dppa.evaluation.scoring import BaseInMemory
from dppa.extract import extract_delta
from dppa.merging.merge import merge_deltas


def state(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def models(tiny_zoo):
    return tiny_zoo / "base", tiny_zoo / "arith", tiny_zoo / "facts"


@pytest.fixture(scope="module")
def merged_at_1(models, tmp_path_factory):
    base, ft1, ft2 = models
    work = tmp_path_factory.mktemp("scoring")
    deltas = [extract_delta(base, ft, work / f"d{i}", progress=False) for i, ft in enumerate((ft1, ft2))]
    return merge_deltas(base, deltas, work / "m1", method="task_arithmetic", scale=1.0, progress=False), deltas


@pytest.mark.parametrize("scale", [0.3, 1.0])
def test_scaled_merge_in_memory_is_base_plus_scale_times_the_summed_deltas(models, merged_at_1, scale):
    base, ft1, ft2 = models
    b, f1, f2 = state(base), state(ft1), state(ft2)
    model = BaseInMemory(base, "cpu")
    params = dict(model.model.named_parameters())
    model.weights.towards(merged_at_1[0], scale)
    for name, param in params.items():
        expected = b[name] + scale * ((f1[name] - b[name]) + (f2[name] - b[name]))
        torch.testing.assert_close(param.detach(), expected, atol=2e-6, rtol=0)
    model.weights.restore()
    for name, param in params.items():  # restored exactly
        assert torch.equal(param.detach(), b[name])


def test_a_delta_in_memory_gives_the_finetune(models, merged_at_1):
    base, ft1, _ = models
    f1 = state(ft1)
    model = BaseInMemory(base, "cpu")
    model.weights.add_delta(merged_at_1[1][0])
    for name, param in model.model.named_parameters():
        torch.testing.assert_close(param.detach(), f1[name], atol=1e-6, rtol=0)
