"""Where the transformer blocks of the language model live, for each model family.

The pruning scope is every weight matrix of every transformer block of the language model, whatever its name: attention
and MLP projections, fused ones (`qkv_proj`, `gate_up_proj`, `query_key_value`, GPT-2's `c_attn`), every MoE expert,
and the MoE router (`gate`, `shared_expert_gate`), because the reference prunes every `nn.Linear` found in a block and
the router is one. A family is therefore described by one thing only: the name prefix of its language model's blocks,
with the block index captured as `layer`. Everything else follows from the tensor names and shapes: the matrices
(2-D tensors that are not biases) under a block prefix are in scope; embeddings, the LM head and final norm
live outside the blocks, and norms and biases are 1-D. GPT-2 stores its projections as `Conv1D` weights, transposed
(in, out): the magnitudes are the same, so nothing changes for pruning. A vision tower's blocks
(`vision_tower.encoder.layers.N`) sit under another prefix and stay out of scope, so they never pool with the language
model's block N.
"""

from __future__ import annotations

import re
from collections import Counter

# model_type (config.json) -> regex of the language model's block prefix, anchored at the start of the name
_DECODER_LAYERS = r"^model\.layers\.(?P<layer>\d+)\."
BLOCK_PREFIXES: dict[str, str] = {
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi3",
            "olmo",
            "olmo2",
        ),
        _DECODER_LAYERS,
    ),
    # Gemma 3 with its vision tower: transformers saves the language model as `language_model.model`, and
    # checkpoints written by later versions use `model.language_model`
    "gemma3": r"^(?:language_model\.model|model\.language_model)\.layers\.(?P<layer>\d+)\.",
    "gpt_neox": r"^gpt_neox\.layers\.(?P<layer>\d+)\.",
    "gpt2": r"^(?:transformer\.)?h\.(?P<layer>\d+)\.",  # hub checkpoints of GPT-2 itself have no `transformer.`
    "falcon": r"^transformer\.h\.(?P<layer>\d+)\.",
}

# Anything that looks like a block of some stack, whatever the model: used to name the matrices no rule covers
ANY_BLOCK = re.compile(r"^(?P<prefix>(?:.*?\.)?(?:layers|layer|h|blocks|block))\.(?P<layer>\d+)\.")
# Stacks that are not the language model, preferred last when suggesting a --scope for an unknown architecture
_NON_LANGUAGE = re.compile(r"vision|visual|image|audio|speech|encoder")


def is_matrix(name: str, shape: tuple[int, ...]) -> bool:
    """A weight matrix (2-D, or a stack of them such as fused experts `experts.gate_up_proj`), not a bias.

    Norm scales and most biases are 1-D; stacked expert biases (`experts.gate_up_proj_bias`) are 2-D.
    """
    return len(shape) >= 2 and "bias" not in name.rsplit(".", 1)[-1]


def block_prefix(config: dict | None) -> re.Pattern | None:
    """The language model's block prefix for this config.json, or None when its model_type has no rule."""
    pattern = BLOCK_PREFIXES.get((config or {}).get("model_type"))
    return re.compile(pattern) if pattern else None


def block_matrices(shapes: dict[str, tuple[int, ...]], blocks: re.Pattern = ANY_BLOCK) -> dict[str, int]:
    """{name: block index} of the weight matrices (any rank >= 2) under `blocks`."""
    found = {}
    for name, shape in shapes.items():
        m = blocks.match(name)
        if m and is_matrix(name, shape):
            found[name] = int(m.group("layer"))
    return found


def block_weights(config: dict | None, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """{name: block index} of the 2-D weight matrices in the language model's blocks (what `--scope auto` prunes),
    under any block-like prefix when the model_type has no rule. Extract writes every other tensor to shards of its
    own, which pruned and amplified deltas share with the delta (dppa/io/sparse.py)."""
    found = block_matrices(shapes, block_prefix(config) or ANY_BLOCK)
    return {name: layer for name, layer in found.items() if len(shapes[name]) == 2}


def suggest_scope(names: list[str]) -> str:
    """A --scope regex naming the block matrices `names` of one stack (the language model's, when it can tell)."""
    matches = [ANY_BLOCK.match(n) for n in names]
    by_prefix = Counter(m.group("prefix") for m in matches)
    prefix = max(by_prefix, key=lambda p: (not _NON_LANGUAGE.search(p), by_prefix[p]))
    leaves = {tuple(re.split(r"\d+", m.string[m.end() :])) for m in matches if m.group("prefix") == prefix}
    alternatives = "|".join(r"\d+".join(map(re.escape, parts)) for parts in sorted(leaves))
    return rf"^{re.escape(prefix)}\.(?P<layer>\d+)\.(?:{alternatives})$"
