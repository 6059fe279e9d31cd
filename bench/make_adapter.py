"""A PEFT-format LoRA adapter of a synthetic base, and the merged model folder it makes, for `bench/README.md`'s
comparison of `dppa extract BASE ADAPTER` with `dppa extract BASE MERGED`.

    python bench/make_synthetic.py bench/out/syn-220m --params 220M --layers 2 --finetunes 0
    python bench/make_adapter.py bench/out/syn-220m/base bench/out/lora --rank 16
    B=bench/out/syn-220m/base L=bench/out/lora
    farm-bench -n 5 -- .venv/bin/dppa extract $B $L/adapter -o /tmp/d1 -q --overwrite \
        --vs ".venv/bin/dppa extract $B $L/merged -o /tmp/d2 -q --overwrite"

OUT/adapter: adapter_config.json + adapter_model.safetensors, rank --rank on every attention and MLP projection of
every block (seeded normal factors, as peft names and shapes them). OUT/merged: the base with those modules
replaced by what peft's merge_and_unload() writes, streamed through dppa's own adapter reader (so the two extracts
read the same fine-tune).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from dppa.io.adapter import open_model
from dppa.io.model_files import copy_model_files
from dppa.io.reader import open_checkpoint
from dppa.io.writer import ShardedWriter

PROJECTION = re.compile(r"^(model\.layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj))\.weight$")


def write_adapter(base: Path, out: Path, rank: int, alpha: int, seed: int) -> None:
    reader = open_checkpoint(base)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in reader.names():
        match = PROJECTION.match(name)
        if match:
            rows, cols = reader.shape(name)
            module = f"base_model.model.{match.group(1)}"
            tensors[f"{module}.lora_A.weight"] = (torch.randn((rank, cols), generator=gen) / cols**0.5).to(
                torch.bfloat16
            )
            tensors[f"{module}.lora_B.weight"] = (torch.randn((rows, rank), generator=gen) * 1e-3).to(torch.bfloat16)
    out.mkdir(parents=True)
    save_file(tensors, out / "adapter_model.safetensors")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets}
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}, indent=2))


def write_merged(base: Path, adapter: Path, out: Path) -> None:
    model = open_model(adapter, base)
    plan = [(n, model.dtype(n), model.shape(n)) for n in model.names()]
    out.mkdir(parents=True)
    writer = ShardedWriter(out, plan, 500 * 1000**2)
    for name in model.names():
        writer.write(name, model.read_flat(name))
    writer.close()
    copy_model_files(base, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", type=Path, help="base model folder (e.g. from bench/make_synthetic.py)")
    p.add_argument("out", type=Path, help="folder to create; gets adapter/ and merged/")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args()
    if args.out.exists():
        if not args.overwrite:
            raise SystemExit(f"{args.out}: exists; pass --overwrite to replace it")
        shutil.rmtree(args.out)
    write_adapter(args.base, args.out / "adapter", args.rank, args.alpha, args.seed)
    write_merged(args.base, args.out / "adapter", args.out / "merged")
    print(args.out)


if __name__ == "__main__":
    main()
