"""In-memory candidates equal the folder route (`dppa amplify` then `dppa apply`) and restore the base exactly."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from dppa.errors import DppaError
from dppa.evaluation.weights import CandidateWeights, candidates_for_delta
from dppa.extract import extract_delta
from dppa.merging.merge import apply_delta
from dppa.sparsify.bands import amplify_delta, compute_bands

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


def _amplified_by_hand(model_params, bands, factors, stored):
    """base + amplified delta as the folder route computes it, in plain torch: factor by band (0 pruned, the
    largest out of scope) x delta in float32, rounded to the delta's stored dtype, + base in float32, rounded to the
    parameter's dtype."""
    table = torch.tensor([0.0, max(factors[0], factors[1]), factors[1], max(factors)])
    expected = {}
    for name, (delta, index) in bands.items():
        band = torch.full(delta.shape, 3) if index is None else index.long()
        amplified = (delta * table[band]).to(stored[name]).float()
        expected[name] = (model_params[name].detach().float() + amplified).to(model_params[name].dtype)
    return expected


def _bits(tensor):
    return tensor.detach().float().view(torch.int32)  # float32 holds every value exactly; the sign of 0 shows


def test_pruned_zeros_nonfinite_and_mixed_dtypes_as_the_plain_computation(tmp_path):
    # Pruned elements are left at the base, which base + 0 x delta equals except for a base of -0.0 (the sum is
    # +0.0) and a non-finite delta (NaN): those are planted here, in a model whose parameters have two dtypes.
    base_dir, delta_dir = _save_pair(tmp_path, torch.float32)
    bands, _ = compute_bands(delta_dir, DENSITIES)
    name = "model.layers.0.mlp.up_proj.weight"
    pruned = (bands[name][1] == 0).nonzero()[:6]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for module in model.model.layers[1].modules():
        module.to(torch.bfloat16)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for row, col in pruned[:3].tolist():
            params[name][row, col] = -0.0
            bands[name][0][row, col] = abs(bands[name][0][row, col]) + 1e-3
        row, col = pruned[3].tolist()
        bands[name][0][row, col] = float("inf")
    stored = {n: torch.float32 for n in bands}
    factors = (1.3, 0.7)
    expected = _amplified_by_hand(params, bands, factors, stored)
    original = {n: p.detach().clone() for n, p in params.items()}
    builder = CandidateWeights(model, {n: (d.clone(), i) for n, (d, i) in bands.items()}, 2)
    builder.amplify(factors)
    assert {p.dtype for p in model.parameters()} == {torch.float32, torch.bfloat16}
    for n, value in expected.items():
        assert params[n].dtype == value.dtype
        assert torch.equal(_bits(params[n]), _bits(value)), n
    assert torch.isnan(params[name]).sum() == 1 and (_bits(params[name]) == 0).sum() >= 3  # +0.0 where -0.0 was
    builder.restore()
    assert all(torch.equal(_bits(p), _bits(original[n])) for n, p in params.items())


def test_amplify_after_other_candidates_starts_from_the_base(tmp_path):
    # add_delta, towards and load_weights change pruned elements too; the next amplified candidate must not keep
    # them (amplify leaves pruned elements alone only while they hold the base).
    base_dir, delta_dir = _save_pair(tmp_path, torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    builder = candidates_for_delta(model, delta_dir, DENSITIES)
    expected = _folder_candidate(tmp_path, base_dir, delta_dir, (1.5, 0.5))
    for other in [
        lambda: builder.add_delta(delta_dir, scale=0.5),
        lambda: builder.towards(tmp_path / "ft", 2.0),
        lambda: builder.load_weights(tmp_path / "ft"),
    ]:
        other()
        builder.amplify((1.5, 0.5))
        for name, param in model.named_parameters():
            assert torch.equal(param, expected[name]), name


def test_a_bf16_model_computing_in_float32_holds_the_saved_candidates_upcast(tmp_path):
    """On CPU a bf16 model is evaluated in float32 (dppa.evaluation.harness.to_compute_dtype); every candidate must
    still be what a bf16 folder holds: the folder route's tensors for an amplified delta, and for the other kinds
    what the same calls give on a model kept in bf16 (whose rounding the tests above check), upcast exactly."""
    from dppa.evaluation.harness import to_compute_dtype

    base_dir, delta_dir = _save_pair(tmp_path, torch.bfloat16)
    upcast = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    saved = to_compute_dtype(upcast)
    assert set(saved.values()) == {torch.bfloat16}
    assert {p.dtype for p in upcast.parameters()} == {torch.float32}
    kept = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    original = {name: p.detach().clone() for name, p in kept.named_parameters()}
    builder = candidates_for_delta(upcast, delta_dir, DENSITIES, saved_dtypes=saved)
    for factors in [(1.8, 1.0), (0.9, 1.4)]:
        expected = _folder_candidate(tmp_path, base_dir, delta_dir, factors)
        builder.amplify(factors)
        params = dict(upcast.named_parameters())
        for name, value in expected.items():
            assert value.dtype == torch.bfloat16 and params[name].dtype == torch.float32
            assert torch.equal(params[name], value.float()), name
    plain = CandidateWeights(kept)
    for call in [
        lambda w: w.add_delta(delta_dir, scale=0.7),
        lambda w: w.towards(tmp_path / "ft", 1.3),
        lambda w: w.load_weights(tmp_path / "ft"),
    ]:
        call(builder)
        call(plain)
        in_bf16 = dict(kept.named_parameters())
        for name, param in upcast.named_parameters():
            assert torch.equal(param, in_bf16[name].float()), name
    builder.restore()
    for name, param in upcast.named_parameters():
        assert torch.equal(param, original[name].float()), name
