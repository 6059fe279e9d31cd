"""In-memory candidates equal the folder route (`dppa amplify` then `dppa apply`) and restore the base exactly."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from dppa.errors import DppaError
from dppa.evaluation.weights import CandidateWeights, candidates_for_delta
from dppa.extract import extract_delta
from dppa.merging.merge import apply_delta
from dppa.sparsify.bands import amplify_delta

DENSITIES = [0.1, 0.2]


def _save_pair(root, dtype):
    """A tiny LLaMA base and a 'fine-tune' whose delta has heavy tails, so DP's per-module densities differ."""
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(dtype)
    base.save_pretrained(root / "base")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in base.parameters():
            noise = torch.randn(param.shape, generator=generator) ** 3 * 0.01
            param.add_(noise.to(dtype))
    base.save_pretrained(root / "ft")
    extract_delta(root / "base", root / "ft", root / "delta", progress=False)
    return root / "base", root / "delta"


def _folder_candidate(root, base, delta, factors):
    tag = "_".join(str(f) for f in factors)
    amplified = amplify_delta(delta, root / f"amp_{tag}", densities=DENSITIES, factors=list(factors), progress=False)
    model_dir = apply_delta(base, amplified, root / f"model_{tag}", progress=False)
    tensors = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_candidate_equals_amplify_then_apply(tmp_path, dtype):
    base_dir, delta_dir = _save_pair(tmp_path, dtype)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    builder = candidates_for_delta(model, delta_dir, DENSITIES)
    # (0.9, 1.4): alpha_B > alpha_A, so the max rule lifts band A to 1.4 as well.
    for factors in [(1.8, 1.0), (0.9, 1.4)]:
        expected = _folder_candidate(tmp_path, base_dir, delta_dir, factors)
        builder.amplify(factors)
        params = dict(model.named_parameters())
        assert set(expected) == set(params)
        for name, value in expected.items():
            assert params[name].dtype == value.dtype
            torch.testing.assert_close(params[name], value, rtol=0, atol=0, msg=name)
        changed = sum(not torch.equal(params[n], original[n]) for n in params)
        assert changed == len(params)
    builder.restore()
    for name, param in model.named_parameters():
        assert torch.equal(param, original[name]), name


def test_candidates_do_not_accumulate_and_context_restores(tmp_path):
    base_dir, delta_dir = _save_pair(tmp_path, torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    builder = candidates_for_delta(model, delta_dir, DENSITIES)
    builder.amplify((2.0, 1.2))
    direct = {name: p.detach().clone() for name, p in model.named_parameters()}
    builder.amplify((1.0, 0.0))
    builder.amplify((2.0, 1.2))
    assert all(torch.equal(p, direct[n]) for n, p in model.named_parameters())
    with builder.candidate((1.5, 1.5)) as candidate:
        assert candidate is model and builder.factors == (1.5, 1.5)
    assert builder.factors is None
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())
    with pytest.raises(DppaError, match="one factor per band"):
        builder.amplify((1.0,))
    with pytest.raises(DppaError, match=">= 0"):
        builder.amplify((1.0, -0.1))


def test_delta_folder_and_model_folder_weights_and_restore(tmp_path):
    base_dir, delta_dir = _save_pair(tmp_path, torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    finetuned = {}
    for shard in sorted((tmp_path / "ft").glob("*.safetensors")):
        finetuned.update(load_file(shard))
    weights = CandidateWeights(model)
    weights.add_delta(delta_dir, scale=0.5)
    weights.add_delta(delta_dir, scale=0.5)  # each call starts from the base: no accumulation
    for name, param in model.named_parameters():
        expected = original[name] + 0.5 * (finetuned[name] - original[name])
        torch.testing.assert_close(param, expected, rtol=0, atol=1e-6, msg=name)
    weights.load_weights(tmp_path / "ft")
    assert all(torch.equal(p, finetuned[n]) for n, p in model.named_parameters())
    weights.restore()
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    save_file({"not.a.parameter": torch.ones(2)}, foreign / "model.safetensors")
    with pytest.raises(DppaError, match="not.a.parameter"):
        weights.add_delta(foreign)
