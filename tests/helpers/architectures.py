"""Tiny random models of each supported architecture family, built offline with transformers, and their fine-tunes."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.helpers.delta_files import load_delta

SMALL = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


# model_type -> config overrides: 4 query heads on 2 key/value heads (grouped-query attention) wherever the family
# has it; qwen2 has q/k/v biases; gemma2, gemma3_text, gpt2 and falcon tie the LM head to the embeddings
FAMILIES = {
    "llama": SMALL,
    "mistral": SMALL,
    "qwen2": SMALL,
    "qwen3": {**SMALL, "head_dim": 8},
    "gemma2": {**SMALL, "head_dim": 8},
    "gemma3_text": {**SMALL, "head_dim": 8},
    "phi3": SMALL,
    "mixtral": {**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        **SMALL,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 32,
    },
    "gpt_neox": {k: v for k, v in SMALL.items() if k != "num_key_value_heads"},
    "gpt2": dict(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, **IDS),
    "falcon": dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **IDS),
    "olmo": SMALL,
}


def block_matrices_by_rule(path: Path) -> dict[str, int]:
    """The test's own rule: 2-D `.weight` tensors under `layers.N.` / `h.N.`, outside any vision part, of a
    safetensors file or a delta folder."""
    found = {}
    for name, tensor in (load_delta(path) if path.is_dir() else load_file(path)).items():
        m = re.search(r"(?:^|\.)(?:layers|h)\.(\d+)\.", name)
        if m and name.endswith(".weight") and tensor.dim() == 2 and "vision" not in name:
            found[name] = int(m.group(1))
    return found


def build_base(model_type: str, folder: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **FAMILIES[model_type])
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def build_gemma3_vlm(folder: Path) -> Path:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    text = {**SMALL, "vocab_size": 300, "head_dim": 8}
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=299,
        boi_token_index=297,
        eoi_token_index=298,
    )
    Gemma3ForConditionalGeneration(config).save_pretrained(folder)
    return folder


def make_finetune(base: Path, folder: Path, seed: int) -> Path:
    """base + heavy-tailed seeded noise on every tensor of the saved file, with the base's other files."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, t in load_file(base / "model.safetensors").items():
        noise = torch.randn(t.shape, generator=gen) * 0.01
        noise = noise * torch.where(torch.rand(t.shape, generator=gen) < 0.02, 20.0, 1.0)
        tensors[name] = (t + noise).contiguous()
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    for path in base.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, folder / path.name)
    return folder
