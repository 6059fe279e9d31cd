"""On CPU a model is evaluated in float32 with its weights as saved: a bf16 folder's weights upcast exactly, and a
LoRA adapter's tensors rounded to the base's dtype first, as peft's merge writes them."""

import torch
from safetensors.torch import load_file

from dppa.evaluation.harness import compute_dtype, load_model
from dppa.zoo.tokenizer import train_tokenizer
from tests.helpers.synthetic import make_base, make_lora_adapter


def bf16_base(folder):
    """A tiny bf16 LLaMA with a tokenizer (load_model loads both)."""
    make_base(folder, dtype=torch.bfloat16, vocab_size=320)
    train_tokenizer(["a tiny text"], vocab_size=300).save_pretrained(folder)
    return folder


def test_a_bf16_folder_computes_in_float32_on_cpu_with_its_saved_weights(tmp_path):
    base = bf16_base(tmp_path / "base")
    saved = load_file(base / "model.safetensors")
    model, _ = load_model(base, device="cpu")
    params = dict(model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.float32}
    assert all(torch.equal(params[name], value.float()) for name, value in saved.items() if name in params)
    kept, _ = load_model(base, device="cpu", upcast=False)
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    assert compute_dtype("cpu") == "float32" and compute_dtype("cuda") == "saved"


def test_an_adapter_is_rounded_to_the_base_dtype_before_the_upcast(tmp_path):
    base = bf16_base(tmp_path / "base")
    module = "model.layers.0.self_attn.q_proj"
    model, _ = load_model(base, device="cpu", upcast=False)
    shape = tuple(dict(model.named_parameters())[f"{module}.weight"].shape)
    adapter = make_lora_adapter(tmp_path / "adapter", seed=3, modules={module: shape})
    in_bf16, _ = load_model(adapter, device="cpu", base=base, upcast=False)
    upcast, _ = load_model(adapter, device="cpu", base=base)
    adapted = dict(upcast.named_parameters())[f"{module}.weight"]
    assert adapted.dtype == torch.float32
    assert torch.equal(adapted, adapted.to(torch.bfloat16).float())  # a bf16 value, not the float32 sum
    assert not torch.equal(adapted, dict(model.named_parameters())[f"{module}.weight"].float())  # adapted
    kept = dict(in_bf16.named_parameters())
    assert all(torch.equal(param, kept[name].float()) for name, param in upcast.named_parameters())
