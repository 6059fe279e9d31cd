"""Which tensors the pruning methods touch (the "pruning scope") and which transformer block each belongs to.

`--scope auto` (the default) works the scope out from the delta folder's config.json and its tensor names and shapes
(dppa/architectures): every weight matrix of every block of the language model. A user regex replaces it; its group
`layer` (or its first group) captures the block index. Either way, block matrices the scope leaves dense are named:
on stderr in one line, and in the manifest (`scope_left_out`).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

from dppa.architectures import ANY_BLOCK, block_matrices, block_prefix, block_weights, suggest_scope
from dppa.errors import DppaError
from dppa.io.reader import CheckpointReader

AUTO = "auto"
DEFAULT_SCOPE = AUTO


@dataclass
class Scope:
    spec: str  # "auto" or the user's regex
    regex: re.Pattern | None = None  # the user's regex; None for "auto"
    layers: dict[str, int] | None = None  # {in-scope name: block index}, once known from a checkpoint's names
    left_out: list[str] = field(default_factory=list)  # block matrices outside the scope: they keep a dense delta
    model_type: str | None = None

    def layer_of(self, name: str) -> int | None:
        """Block index if `name` is in scope, else None."""
        if self.layers is not None:
            return self.layers.get(name)
        m = self.regex.search(name)
        return None if m is None else _layer_group(self.regex, m)

    def search(self, name: str) -> bool:
        return self.layer_of(name) is not None

    def record(self) -> dict:
        """Manifest entries describing the scope."""
        return {"scope": self.spec, "scope_model_type": self.model_type, "scope_left_out": self.left_out}


def _layer_group(regex: re.Pattern, m: re.Match) -> int:
    return int(m.group("layer") if "layer" in regex.groupindex else m.group(1))


def compile_scope(spec: str | Scope, reader: CheckpointReader | None = None) -> Scope:
    """The scope `spec` ("auto" or a regex) on the checkpoint at `reader`; a Scope is returned as it is.

    Without a reader only a regex can be compiled, and tensors are then matched by name alone.
    """
    if isinstance(spec, Scope):
        return spec
    if spec == AUTO:
        if reader is None:
            raise DppaError("--scope auto: the scope is worked out from a checkpoint; none was given")
        return _auto_scope(reader)
    try:
        regex = re.compile(spec)
    except re.error as exc:
        raise DppaError(f"--scope {spec!r}: not a valid regular expression ({exc})") from None
    if "layer" not in regex.groupindex and regex.groups == 0:
        raise DppaError(f"--scope {spec!r}: needs a group capturing the layer index, e.g. (?P<layer>\\d+)")
    scope = Scope(spec, regex)
    if reader is None:
        return scope
    names = reader.names()
    scope.layers = {n: _layer_group(regex, m) for n in names if (m := regex.search(n))}
    blocks = block_prefix(reader.config) or ANY_BLOCK
    shapes = {n: reader.shape(n) for n in names}
    scope.left_out = [n for n in block_matrices(shapes, blocks) if n not in scope.layers]
    scope.model_type = (reader.config or {}).get("model_type")
    if scope.left_out:
        more = f" and {len(scope.left_out) - 3} more" if len(scope.left_out) > 3 else ""
        print(
            f"dppa: note: --scope '{spec}' leaves {len(scope.left_out)} block weight matrices with their dense "
            f"delta: {', '.join(scope.left_out[:3])}{more} (listed in the manifest as scope_left_out)",
            file=sys.stderr,
        )
    return scope


def _auto_scope(reader: CheckpointReader) -> Scope:
    shapes = {n: reader.shape(n) for n in reader.names()}
    model_type = (reader.config or {}).get("model_type")
    blocks = block_prefix(reader.config)
    if blocks is None:
        found = block_matrices(shapes)
        source = (
            f"model_type {model_type!r} (config.json) has no pruning-scope rule"
            if reader.config
            else "no config.json says which architecture this is"
        )
        if not found:
            raise DppaError(
                f"{reader.folder}: {source} and no tensor looks like a transformer block (layers.N.); "
                "pass --scope REGEX with a group (?P<layer>\\d+) capturing the block index"
            )
        names = list(found)
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        raise DppaError(
            f"{reader.folder}: {source}; no rule covers the block weight matrices "
            f"{', '.join(names[:3])}{more}; pass --scope '{suggest_scope(names)}'"
        )
    in_blocks = block_matrices(shapes, blocks)
    layers = block_weights(reader.config, shapes)
    if not layers:
        raise DppaError(
            f"{reader.folder}: model_type {model_type!r} but no 2-D weight is under {blocks.pattern!r}; "
            "the checkpoint's names differ from transformers'; pass --scope REGEX"
        )
    left_out = [n for n in in_blocks if n not in layers]  # stacked (3-D) expert weights: pruned per matrix by nothing
    scope = Scope(AUTO, layers=layers, left_out=left_out, model_type=model_type)
    if left_out:
        print(
            f"dppa: note: {len(left_out)} block weights are not 2-D and keep their dense delta: "
            f"{', '.join(left_out[:3])} (listed in the manifest as scope_left_out)",
            file=sys.stderr,
        )
    return scope


def layer_of(scope: Scope, name: str) -> int | None:
    """Block index if `name` is in scope, else None."""
    return scope.layer_of(name)
