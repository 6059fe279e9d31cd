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
