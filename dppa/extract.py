"""Delta extraction: delta = finetuned - base, per tensor in float32, streamed chunk by chunk.

The tensors outside the blocks' weight matrices (embeddings, norms, biases, LM head) are written first, to shared
shards of their own (dppa/io/sparse.py), which the pruned and amplified deltas of this delta hard-link. A tensor
whose delta is known to be exactly zero before writing (a module a LoRA adapter leaves alone, a frozen embedding)
takes no bytes: its file's header lists it (dppa/io/sparse.py, "Zero tensors").

Vocabulary growth rule: when a fine-tune's embedding or LM-head matrix has more rows than the base's (tokens were
added), the delta covers the base's rows only and the added rows are dropped, so every delta has the base's shapes
and merged models keep the base's vocabulary and tokenizer. The manifest lists each such tensor under
`vocab_growth`. Any other shape difference is an error.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from dppa.architectures import block_weights
from dppa.compute import PARALLEL_CHUNK_ELEMS, chunk_ranges, resolve_device
from dppa.errors import DppaError
from dppa.io.adapter import AdapterModel, open_finetune, provenance
from dppa.io.atomic import check_output_free
from dppa.io.fingerprint import base_fingerprint
from dppa.io.manifest import source_record, write_manifest
from dppa.io.reader import CheckpointReader, open_checkpoint
from dppa.io.stream import Stream, StreamInput
from dppa.io.writer import ShardedWriter, parse_size

VOCAB_TENSOR = re.compile(r"(embed_tokens|lm_head|wte|embed_in|embed_out|word_embeddings|output)\.weight$")
ARCH_KEYS = (
    "model_type",
    "architectures",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name == "source":
        return None
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise DppaError(f"--dtype {name}: unknown dtype; use one of {', '.join(DTYPE_NAMES)} or source") from None


def check_same_architecture(base: CheckpointReader, other: CheckpointReader) -> None:
    if base.config is None or other.config is None:
        return
    for key in ARCH_KEYS:
        a, b = base.config.get(key), other.config.get(key)
        if a is not None and b is not None and a != b:
            raise DppaError(
                f"{other.folder / 'config.json'}: {key} is {b!r} but the base ({base.folder}) has {a!r}; "
                "a delta needs a model fine-tuned from this base"
            )


def check_finite(chunk: torch.Tensor, reader: CheckpointReader, name: str) -> None:
    if not bool(torch.isfinite(chunk).all()):
        raise DppaError(
            f"{reader.info(name).file}: tensor {name!r} contains NaN or Inf; the checkpoint is corrupt or diverged"
        )


def matching_rows(base: CheckpointReader, ft: CheckpointReader, name: str) -> bool:
    """True when shapes match; False when `ft` grew the vocabulary of `name`; error otherwise."""
    bshape, fshape = base.shape(name), ft.shape(name)
    if bshape == fshape:
        return True
    grown_rows = len(bshape) == len(fshape) >= 1 and fshape[0] > bshape[0] and fshape[1:] == bshape[1:]
    if VOCAB_TENSOR.search(name) and grown_rows:
        return False
    raise DppaError(
        f"{ft.info(name).file}: tensor {name!r} has shape {list(fshape)} but the base has {list(bshape)}; "
        "the fine-tune does not match this base"
    )


FT_ADVICE = "the fine-tune does not match this base"


def check_same_tensors(base: CheckpointReader, other: CheckpointReader, advice: str = FT_ADVICE) -> None:
    """`other` (a fine-tune or a delta) has exactly the base's tensor names; `advice` ends the error."""
    base_names, names = set(base.names()), set(other.names())
    for name in sorted(base_names - names):
        raise DppaError(f"{other.folder}: tensor {name!r} of the base is missing; {advice}")
    for name in sorted(names - base_names):
        raise DppaError(f"{other.folder}: tensor {name!r} is not in the base ({base.folder}); {advice}")


def unchanged_tensors(
    base: CheckpointReader, ft: CheckpointReader, outside: list[str], grown: set[str], chunk_elems: int
) -> set[str]:
    """The tensors whose delta is exactly zero, known before any is written: every one a LoRA adapter leaves alone,
    and those outside the blocks (embeddings, norms: a few, often frozen) that equal the base's, value for value."""
    if isinstance(ft, AdapterModel):
        return set(ft.names()) - set(ft.changed()) - grown
    same = set()
    for name in outside:
        if name in grown or ft.dtype(name) != base.dtype(name):
            continue
        spans = chunk_ranges(base.numel(name), chunk_elems)
        if all(torch.equal(base.read_flat(name, a, n), ft.read_flat(name, a, n)) for a, n in spans):
            same.add(name)
    return same


def _delta_chunks(base_r: CheckpointReader, ft_r: CheckpointReader, name: str, dtype: torch.dtype, dev):
    """The chunk function of tensor `name`: ((raw base chunk, raw fine-tune chunk), delta chunk in `dtype`,
    (sum, max) of the delta's magnitudes)."""

    def delta_chunk(span: tuple[int, int]):
        start, count = span
        raw_base, raw_ft = base_r.read_flat(name, start, count), ft_r.read_flat(name, start, count)
        b, f = raw_base.to(dev, torch.float32), raw_ft.to(dev, torch.float32)
        delta = f.sub(b)  # not in place: for float32 inputs `f` is raw_ft itself, hashed by the stream
        magnitude = delta.abs()
        abs_sum = float(magnitude.sum(dtype=torch.float64))
        abs_max = float(magnitude.max()) if count else 0.0
        if not math.isfinite(abs_sum):  # a NaN or Inf in either input shows here; find which one
            check_finite(b, base_r, name)
            check_finite(f, ft_r, name)
            raise DppaError(
                f"{ft_r.info(name).file}: tensor {name!r} minus the base overflows float32; "
                "the checkpoint is corrupt or diverged"
            )
        return (raw_base, raw_ft), delta.to(dtype).cpu(), (abs_sum, abs_max)

    return delta_chunk


def extract_delta(
    base: str | os.PathLike,
    finetuned: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
    max_shard_size: int | str = "5GB",
    chunk_elems: int = PARALLEL_CHUNK_ELEMS,
) -> Path:
    """Write `finetuned - base` as a delta folder at `out`; returns `out`."""
    out = Path(out)
    check_output_free(out, overwrite)
    dev = resolve_device(device)
    out_dtype = parse_dtype(dtype) if isinstance(dtype, str) or dtype is None else dtype
    base_r = open_checkpoint(base, allow_pickle)
    ft_r = open_finetune(finetuned, base_r, allow_pickle)  # a model folder, or a LoRA adapter read as one
    check_same_architecture(base_r, ft_r)
    check_same_tensors(base_r, ft_r)
    names = base_r.names()
    grown = {n: [base_r.shape(n)[0], ft_r.shape(n)[0]] for n in names if not matching_rows(base_r, ft_r, n)}
    # Everything outside the blocks' weight matrices first, in shards of its own that prune and amplify link
    in_blocks = block_weights(base_r.config, {n: base_r.shape(n) for n in names})
    outside = [n for n in names if n not in in_blocks]
    names = outside + [n for n in names if n in in_blocks]
    plan_dtype = {n: out_dtype or ft_r.dtype(n) for n in names}
    zero = unchanged_tensors(base_r, ft_r, outside, set(grown), chunk_elems)  # stored as nothing
    inputs = [StreamInput(base_r), StreamInput(ft_r)]  # both hashed as they are read
    fingerprint = base_fingerprint(base_r)  # merge compares it with its base before any work
    stats: dict[str, dict] = {}
    with Stream(
        out,
        desc=f"extract {Path(finetuned).name}",
        total_bytes=base_r.total_bytes() + ft_r.total_bytes(),
        tensors=len(names),
        overwrite=overwrite,
        needed_bytes=sum(base_r.numel(n) * plan_dtype[n].itemsize for n in names),
        progress=progress,
    ) as stream:
        plan = [(n, plan_dtype[n], base_r.shape(n)) for n in names]
        stream.writer = ShardedWriter(stream.tmp, plan, parse_size(max_shard_size), shared=len(outside), zero=zero)
        for name in names:
            spans = chunk_ranges(base_r.numel(name), chunk_elems)
            magnitudes = stream.chunks(
                name, spans, _delta_chunks(base_r, ft_r, name, plan_dtype[name], dev), inputs, chunk_elems
            )
            numel = base_r.numel(name)
            stats[name] = {
                "numel": numel,
                "mean_abs": sum(s for s, _ in magnitudes) / numel if numel else 0.0,
                "max_abs": max((m for _, m in magnitudes), default=0.0),
            }
        content_hash = stream.writer.close()
        if base_r.config is not None:
            (stream.tmp / "config.json").write_text((base_r.folder / "config.json").read_text())
        write_manifest(
            stream.tmp,
            {
                "kind": "delta",
                "content_hash": content_hash,
                "storage": {"format": "dense", "zero_tensors": len(zero)},
                "base": {**source_record(base_r.folder, inputs[0].hexdigest()), "fingerprint": fingerprint},
                "finetuned": {**source_record(ft_r.folder, inputs[1].hexdigest()), **provenance(ft_r)},
                "dtype": str(out_dtype).replace("torch.", "") if out_dtype else "source",
                "vocab_growth": grown,
                "pruned": False,
                "tensors": stats,
            },
        )
    return out
