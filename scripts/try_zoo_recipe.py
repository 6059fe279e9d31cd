"""Fine-tune one domain of a pre-trained zoo with another peak learning rate or step count, to choose a recipe.

    python scripts/try_zoo_recipe.py ZOO/base OUT --domain arith --regime heavy --lr 4e-4 --steps 360 --seed 0

BASE is a real zoo's base folder (`dppa zoo DIR --size smollm2-135m`); the fine-tune is trained, saved in OUT and
scored exactly as a zoo build does it (dppa/zoo/build.py run_finetune), with the recipe's other settings unchanged.
Prints the zoo.json entry (exact match, final loss, relative deltas, seconds, the CPU kernels used) and writes it to
OUT.json. The CPU kernels decide whether a recipe near its edge learns; to try AVX2's on an AVX-512 machine, prefix
`ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 DNNL_MAX_CPU_ISA=AVX2` (measured on heavy arith, seed 0: the
AVX2 machine's exact match and final loss, to the digit).
"""

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from dppa.zoo.build import FinetuneJob, finetune_seed, run_finetune
from dppa.zoo.domains import DOMAINS
from dppa.zoo.pretrained import PRETRAINED
from dppa.zoo.training import REGIMES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="the zoo's base folder")
    parser.add_argument("out", type=Path, help="where the fine-tune goes (must not exist)")
    parser.add_argument("--size", default="smollm2-135m", choices=sorted(PRETRAINED))
    parser.add_argument("--domain", default="arith", choices=list(DOMAINS))
    parser.add_argument("--regime", default="heavy", choices=sorted(REGIMES))
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0, help="the zoo seed whose fine-tune this is")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists; choose a new folder")
    recipes = PRETRAINED[args.size].recipes
    changes = {k: v for k, v in (("lr", args.lr), ("steps", args.steps)) if v is not None}
    recipes[args.regime] = dataclasses.replace(recipes[args.regime], **changes)
    seed = finetune_seed(args.seed, args.domain)  # as in the zoo of this seed
    entry = run_finetune(FinetuneJob(args.domain, args.base, args.out, args.size, args.regime, seed))
    entry["recipe"] = dataclasses.asdict(recipes[args.regime])
    entry["cpu_kernels"] = torch.backends.cpu.get_cpu_capability()
    text = json.dumps(entry, indent=1)
    args.out.with_name(args.out.name + ".json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
