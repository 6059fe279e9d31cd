"""A model written by `dppa merge` equals the same merge computed in memory, down to the logits."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from dppa.cli import main
from dppa.merging.merge import merge_chunk, ties_trim_count
from dppa.sparsify.threshold import topk_mask
from tests.synthetic import make_base, make_finetune


def in_memory_merge(base_dir, ft_dirs, method, density, scale, weights):
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    fts = [AutoModelForCausalLM.from_pretrained(d).state_dict() for d in ft_dirs]
    state = base.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            b = value.float()
            # deltas are stored in the source dtype (extract's default), so round them the same way here
            deltas = [(ft[name].float() - b).to(value.dtype).float() for ft in fts]
            if density is not None:
                deltas = [d * topk_mask(d.abs(), ties_trim_count(density, d.numel())) for d in deltas]
            merged = merge_chunk(b.clone(), deltas, weights, method, scale)
            value.copy_(merged.to(value.dtype))
    return base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,density", [("ties", 0.2), ("task_arithmetic", None)])
def test_merged_model_logits_equal_in_memory_merge(tmp_path, dtype, method, density):
    base = make_base(tmp_path / "base", dtype=dtype)
    fts = [make_finetune(base, tmp_path / f"ft{i}", seed=i) for i in (1, 2)]
    deltas = []
    for i, ft in enumerate(fts):
        assert main(["extract", str(base), str(ft), "-o", str(tmp_path / f"d{i}"), "-q"]) == 0
        deltas.append(str(tmp_path / f"d{i}"))
    args = ["merge", str(base), *deltas, "-o", str(tmp_path / "merged"), "--method", method, "--scale", "0.7",
            "--weights", "1.0,0.5", "-q"]
    assert main(args + (["--density", str(density)] if density else [])) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert loaded.dtype == dtype
    expected = in_memory_merge(base, fts, method, density, 0.7, [1.0, 0.5])
    ids = torch.arange(1, 33).view(2, 16)
    with torch.no_grad():
        got, want = loaded(ids).logits.float(), expected(ids).logits.float()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got, want, atol=tolerance, rtol=tolerance)
    base_logits = AutoModelForCausalLM.from_pretrained(base)(ids).logits.float()
    assert not torch.allclose(got, base_logits, atol=tolerance)  # the merge changed the model
