"""Write a synthetic LLaMA-shaped base model and fine-tunes of it, for benchmarks and memory checks.

    python bench/make_synthetic.py bench/out/syn-1b --params 1B --dtype bf16 --finetunes 2 --seed 0

OUT/base is a Hugging Face model folder (config.json of model_type llama, sharded safetensors with
model.safetensors.index.json, a small word-level tokenizer); OUT/ft1 .. OUT/ftN are the same model plus
heavy-tailed deltas. Everything is a function of --seed, so two runs write identical bytes.

Tensors are generated and written one at a time through a streaming safetensors writer: the header of every
shard is known from the shapes alone, so the data can follow tensor by tensor and memory stays at a few copies
of the largest tensor, whatever the model size.

Delta model (why it looks like this): fine-tuning deltas are small relative to the weights and heavy-tailed, and
how heavy the tail is differs between layers and modules, which is what Dynamic Pruning reacts to. Each delta entry
is a Gaussian scale mixture (normal * exp(sigma * normal), sigma varying per layer and module) plus a sparse set of
larger outliers, scaled to a fraction of the base tensor's RMS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# name -> (hidden, intermediate, layers, heads, kv_heads, vocab)
PRESETS = {
    "tiny": (64, 176, 2, 4, 2, 512),
    "20M": (256, 688, 4, 8, 8, 8000),
    "220M": (1024, 2816, 12, 16, 16, 32000),
    "1B": (2048, 5632, 20, 32, 4, 32000),
    "3B": (3072, 8192, 24, 24, 8, 32000),
}

DTYPES = {
    "bf16": (torch.bfloat16, "BF16", "bfloat16"),
    "fp16": (torch.float16, "F16", "float16"),
    "fp32": (torch.float32, "F32", "float32"),
}

NORM_DELTA_REL = 0.05  # norms sit near 1.0; smaller shifts would round away in bf16
WEIGHT_DELTA_REL = 0.08  # delta RMS as a share of the base tensor's RMS
OUTLIER_SHARE = 1e-3
OUTLIER_GAIN = (8.0, 30.0)


@dataclass(frozen=True)
class Spec:
    name: str
    shape: tuple[int, ...]
    layer: int | None  # transformer block index, None outside the blocks


def tensor_specs(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int) -> list[Spec]:
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    specs = [Spec("model.embed_tokens.weight", (vocab, hidden), None)]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            Spec(p + "input_layernorm.weight", (hidden,), i),
            Spec(p + "self_attn.q_proj.weight", (hidden, hidden), i),
            Spec(p + "self_attn.k_proj.weight", (kv, hidden), i),
            Spec(p + "self_attn.v_proj.weight", (kv, hidden), i),
            Spec(p + "self_attn.o_proj.weight", (hidden, hidden), i),
            Spec(p + "post_attention_layernorm.weight", (hidden,), i),
            Spec(p + "mlp.gate_proj.weight", (inter, hidden), i),
            Spec(p + "mlp.up_proj.weight", (inter, hidden), i),
            Spec(p + "mlp.down_proj.weight", (hidden, inter), i),
        ]
    specs += [Spec("model.norm.weight", (hidden,), None), Spec("lm_head.weight", (vocab, hidden), None)]
    return specs


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def generator(seed: int, *parts: object) -> torch.Generator:
    """A generator whose state depends only on seed and the parts (stable across processes, unlike hash())."""
    key = hashlib.sha256(repr((seed,) + parts).encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
    return g


def base_tensor(spec: Spec, seed: int) -> torch.Tensor:
    g = generator(seed, "base", spec.name)
    if len(spec.shape) == 1:  # RMSNorm weight
        return 1.0 + 0.05 * torch.randn(spec.shape, generator=g)
    return 0.02 * torch.randn(spec.shape, generator=g)


def delta_tensor(spec: Spec, base: torch.Tensor, seed: int, ft: int) -> torch.Tensor:
    """Heavy-tailed delta; tail weight and scale vary per (fine-tune, layer, module)."""
    g = generator(seed, "delta", ft, spec.name)
    layer_g = generator(seed, "layer", ft, spec.layer)
    layer_gain, layer_tail = torch.rand(2, generator=layer_g).tolist()
    mod_gain, mod_tail = torch.rand(2, generator=g).tolist()
    sigma = 0.3 + 0.5 * layer_tail + 0.3 * mod_tail  # log-scale spread: 0.3 (light) .. 1.1 (heavy)
    x = torch.randn(spec.shape, generator=g)
    x.mul_(torch.randn(spec.shape, generator=g).mul_(sigma).exp_())
    n = x.numel()
    n_out = max(1, int(n * OUTLIER_SHARE * (0.5 + layer_tail)))
    idx = torch.randint(0, n, (n_out,), generator=g)
    lo, hi = OUTLIER_GAIN
    x.view(-1)[idx] *= lo + (hi - lo) * torch.rand(n_out, generator=g)
    rel = NORM_DELTA_REL if len(spec.shape) == 1 else WEIGHT_DELTA_REL
    target_rms = rel * (0.5 + layer_gain) * (0.7 + 0.6 * mod_gain) * float(base.pow(2).mean().sqrt())
    x.mul_(target_rms / float(x.pow(2).mean().sqrt()))
    return x


class ShardWriter:
    """Streams tensors into one safetensors file whose header is computed up front from shapes."""

    def __init__(self, path: Path, specs: list[Spec], st_dtype: str, itemsize: int):
        self.file = open(path, "wb")
        self.expected = [s.name for s in specs]
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for s in specs:
            size = numel(s.shape) * itemsize
            header[s.name] = {"dtype": st_dtype, "shape": list(s.shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format wants the data 8-byte aligned
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.data_size = offset

    def write(self, name: str, t: torch.Tensor) -> None:
        assert name == self.expected.pop(0), f"tensors must arrive in header order, got {name}"
        self.file.write(t.contiguous().view(torch.uint8).numpy().data)

    def close(self) -> None:
        assert not self.expected, f"shard closed with tensors missing: {self.expected[:3]}"
        self.file.close()


def plan_shards(specs: list[Spec], itemsize: int, shard_bytes: int) -> list[list[Spec]]:
    shards: list[list[Spec]] = [[]]
    used = 0
    for s in specs:
        size = numel(s.shape) * itemsize
        if shards[-1] and used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(s)
        used += size
    return shards


def llama_config(dims: tuple[int, ...], hf_dtype: str) -> dict:
    hidden, inter, layers, heads, kv_heads, vocab = dims
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": hf_dtype,
    }


def write_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer over the model's vocabulary size, so tools that copy or load a tokenizer find one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<unk>": 0, "<s>": 1, "</s>": 2}
    words.update({f"w{i}": i for i in range(3, vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<unk>",
                "model_max_length": 2048,
            },
            indent=2,
        )
    )


def write_models(
    out: Path, dims: tuple[int, ...], dtype_key: str, finetunes: int, seed: int, shard_bytes: int, tokenizer: bool
) -> None:
    torch_dtype, st_dtype, hf_dtype = DTYPES[dtype_key]
    itemsize = torch.empty(0, dtype=torch_dtype).element_size()
    specs = tensor_specs(*dims)
    shards = plan_shards(specs, itemsize, shard_bytes)
    names = ["base"] + [f"ft{i}" for i in range(1, finetunes + 1)]
    n_shards = len(shards)
    shard_files = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    for m in names:
        folder = out / m
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(llama_config(dims, hf_dtype), indent=2))
        if tokenizer:
            write_tokenizer(folder, dims[-1])
        index = {
            "metadata": {"total_size": sum(numel(s.shape) for s in specs) * itemsize},
            "weight_map": {s.name: shard_files[i] for i, shard in enumerate(shards) for s in shard},
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    total = sum(numel(s.shape) for s in specs)
    done = 0
    t0 = time.time()
    for shard_i, shard in enumerate(shards):
        writers = {m: ShardWriter(out / m / shard_files[shard_i], shard, st_dtype, itemsize) for m in names}
        for spec in shard:
            base32 = base_tensor(spec, seed)
            base_stored = base32.to(torch_dtype)
            writers["base"].write(spec.name, base_stored)
            for ft in range(1, finetunes + 1):
                # The fine-tune is base + delta rounded once into the storage dtype, as a real checkpoint would be.
                ft_t = (base_stored.float() + delta_tensor(spec, base32, seed, ft)).to(torch_dtype)
                writers[f"ft{ft}"].write(spec.name, ft_t)
                del ft_t
            done += numel(spec.shape)
            if sys.stderr.isatty():
                print(f"\r{done / total:6.1%} {spec.name:<50}", end="", file=sys.stderr, flush=True)
        for w in writers.values():
            w.close()
    print(
        f"\rwrote {len(names)} models of {total / 1e6:.1f}M parameters ({dtype_key}) in {time.time() - t0:.1f} s"
        + " " * 30,
        file=sys.stderr,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder to create; gets base/ and ft1/ .. ftN/")
    p.add_argument("--params", default="220M", choices=sorted(PRESETS), help="model size preset")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--finetunes", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", default="500MB", help="maximum shard size, e.g. 500MB, 2GB")
    p.add_argument("--layers", type=int, help="override the preset's number of transformer blocks")
    p.add_argument("--no-tokenizer", action="store_true", help="skip the small word-level tokenizer")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dims = list(PRESETS[args.params])
    if args.layers:
        dims[2] = args.layers
    if args.out.exists() and not args.overwrite:
        print(f"make_synthetic: {args.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    tmp = args.out.with_name(args.out.name + f".tmp-{os.getpid()}")
    try:
        write_models(
            tmp, tuple(dims), args.dtype, args.finetunes, args.seed, parse_size(args.shard_size), not args.no_tokenizer
        )
        if args.out.exists():
            shutil.rmtree(args.out)
        tmp.rename(args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
