"""Sizes of the zoo and the LLaMA-architecture model each size builds."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


@dataclass(frozen=True)
class ZooSize:
    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int
    corpus_sentences: int  # pre-training text (and the tokenizer's), see dppa.zoo.corpus.pretraining_text
    skill_share: float  # share of those sentences that show a domain skill inside running text
    pretrain_steps: int
    pretrain_batch: int
    pretrain_seq: int
    pretrain_lr: float
    finetune_batch: int
    finetune_steps: dict  # regime name -> steps
    eval_limit: int | None  # test examples per task scored into zoo.json (None: the whole split, 500)


SIZES = {
    "tiny": ZooSize(
        name="tiny", hidden=64, layers=2, heads=2, intermediate=64, vocab=320, max_positions=64,
        corpus_sentences=2000, skill_share=0.5, pretrain_steps=40, pretrain_batch=16, pretrain_seq=48,
        pretrain_lr=3e-3, finetune_batch=32, finetune_steps={"heavy": 200, "light": 60}, eval_limit=40,
    ),
    "default": ZooSize(
        name="default", hidden=128, layers=4, heads=4, intermediate=352, vocab=512, max_positions=128,
        corpus_sentences=40000, skill_share=0.6, pretrain_steps=1200, pretrain_batch=32, pretrain_seq=64,
        pretrain_lr=2e-3, finetune_batch=64, finetune_steps={"heavy": 300, "light": 150}, eval_limit=None,
    ),
}  # fmt: skip


def build_model(size: ZooSize, tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model; the same seed gives the same weights."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=size.max_positions,
        tie_word_embeddings=False,  # separate embedding and head tensors keep every delta tensor independent
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
