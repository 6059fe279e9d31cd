"""Small LLaMA-shaped checkpoints made in the tests, deterministically (no hub access needed)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def make_base(folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, **overrides})
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def heavy_tailed(shape, generator: torch.Generator, scale: float) -> torch.Tensor:
    """Student-t-like noise: a normal divided by the root of a chi-square, plus occasional outliers."""
    normal = torch.randn(shape, generator=generator)
    chi = torch.randn((3, *shape), generator=generator).pow(2).mean(0).clamp_min(1e-3)
    return scale * normal / chi.sqrt()


def make_finetune(base: Path, folder: Path, seed: int, scale: float = 0.02, grow_vocab: int = 0) -> Path:
    """base + heavy-tailed deltas; optionally with `grow_vocab` extra embedding / LM-head rows."""
    model = LlamaForCausalLM.from_pretrained(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(heavy_tailed(param.shape, gen, scale).to(param.dtype))
    if grow_vocab:
        model.resize_token_embeddings(model.config.vocab_size + grow_vocab)
    model.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def make_lora_adapter(folder: Path, seed: int, modules: dict[str, tuple[int, int]], r: int = 4, alpha: int = 8) -> Path:
    """A PEFT-format LoRA adapter written by hand (no peft): `modules` maps a module path of the base (e.g.
    `model.layers.0.self_attn.q_proj`) to its (out, in) shape; factors are seeded normals."""
    import json

    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (rows, cols) in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn((r, cols), generator=gen) * 0.1
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn((rows, r), generator=gen) * 0.1
    folder = Path(folder)
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets}
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/base"}))
    return folder
