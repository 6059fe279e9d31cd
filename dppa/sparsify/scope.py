"""Which tensors the pruning methods touch (the "pruning scope") and which transformer block each belongs to."""

from __future__ import annotations

import re

from dppa.errors import DppaError

# Linear projections inside transformer blocks, LLaMA-style names (also Mistral, Qwen2, Gemma, ...).
DEFAULT_SCOPE = r"^(?:.*\.)?layers\.(?P<layer>\d+)\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.weight$"


def compile_scope(pattern: str) -> re.Pattern:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise DppaError(f"--scope {pattern!r}: not a valid regular expression ({exc})") from None
    if "layer" not in regex.groupindex and regex.groups == 0:
        raise DppaError(f"--scope {pattern!r}: needs a group capturing the layer index, e.g. (?P<layer>\\d+)")
    return regex


def layer_of(regex: re.Pattern, name: str) -> int | None:
    """Layer index if `name` is in scope, else None."""
    m = regex.search(name)
    if not m:
        return None
    return int(m.group("layer") if "layer" in regex.groupindex else m.group(1))
