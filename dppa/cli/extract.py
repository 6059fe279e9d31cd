"""`dppa extract`: delta parameters of a fine-tune."""

from dppa.cli import add_command
from dppa.cli.options import add_common, common_kwargs
from dppa.extract import extract_delta

ORDER = 10

DESCRIPTION = """\
Compute delta = FINETUNED - BASE for every tensor (in float32, streamed chunk by chunk) and write it as a
safetensors folder with the model's tensor names, plus dppa_manifest.json recording both inputs, their content
hashes and per-tensor statistics (numel, mean |delta|, max |delta|).

FINETUNED may be a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors): its delta is what
peft's merge_and_unload() would add to BASE (scaling x B @ A per adapted module, in float32; modules_to_save
replace the base's tensors), computed one module at a time; every other tensor's delta is exactly zero. DoRA and
other adapter types (IA3, LoHa, prompt tuning ...) are refused. The manifest records the adapter's
base_model_name_or_path and the tensors it changes.

If the fine-tune added tokens (embedding / LM-head rows beyond the base's), the delta keeps the base's rows only;
the manifest lists those tensors under vocab_growth. Any other shape difference is an error.

example:
  dppa extract models/llama-7b models/llama-7b-math -o data/deltas/math
  dppa extract models/llama-7b adapters/math-lora -o data/deltas/math-lora     # a LoRA adapter
"""


def register(subparsers) -> None:
    p = add_command(subparsers, "extract", "delta = finetuned - base, as a safetensors folder", DESCRIPTION, run)
    p.add_argument("base", metavar="BASE", help="base model folder")
    p.add_argument(
        "finetuned",
        metavar="FINETUNED",
        help="fine-tuned model folder (same architecture), or a LoRA adapter folder of BASE",
    )
    add_common(p)
    p.add_argument(
        "--dtype",
        default="source",
        choices=["source", "float32", "bfloat16", "float16"],
        help="storage dtype of the delta (default: the fine-tune's)",
    )
    p.add_argument("--allow-pickle", action="store_true", help="accept *.bin pickle checkpoints (can run code!)")


def run(args) -> int:
    out = extract_delta(
        args.base, args.finetuned, args.output, dtype=args.dtype, allow_pickle=args.allow_pickle, **common_kwargs(args)
    )
    print(out)
    return 0
