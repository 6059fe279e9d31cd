"""PEFT LoRA adapters read as the fine-tuned model they describe, one module at a time.

An adapter folder (`adapter_config.json` + `adapter_model.safetensors`) is opened against its base as an
`AdapterModel`: a reader with the base's tensor names whose adapted tensors hold exactly what peft's
`merge_and_unload()` would write (docs/method.md, "LoRA adapters"), computed when a tensor is first read and kept
until the next one, so the fine-tuned model is never materialised. Extract and merge take its delta as they take any
fine-tune's (fine-tune minus base in float32, rounded to the fine-tune's dtype): a module the adapter leaves alone
reads as the base and its delta is exactly zero, and an adapter and its `merge_and_unload` folder give the same
bytes.

What peft stores, under the prefix `base_model.model.`:
- `M.lora_A.weight` (r, in) and `M.lora_B.weight` (out, r): module M's weight gains scaling x B @ A, transposed
  with `fan_in_fan_out` (GPT-2's Conv1D stores weights as (in, out));
- `M.lora_embedding_A` (r, vocab) and `M.lora_embedding_B` (dim, r): an embedding gains scaling x (B @ A)^T;
- `M.base_layer.weight`: a full copy of an adapted embedding's weight (peft saves it when embeddings are targeted,
  in case the vocabulary was resized); it replaces the base's before the LoRA term is added;
- any other tensor (`modules_to_save`, e.g. `lm_head.weight`): a full replacement of the base's tensor.
scaling = alpha / r (alpha / sqrt(r) with `use_rslora`), r and alpha per module from `rank_pattern` /
`alpha_pattern`, matched as peft matches them. DoRA, LoRA biases and the other adapter types are refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from dppa.errors import DppaError
from dppa.io.reader import CheckpointReader, TensorInfo, open_checkpoint

ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
LORA_PARTS = {  # tensor-name suffix -> (part, is an embedding adapter)
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}
BASE_LAYER = ".base_layer.weight"
# adapter_config.json options whose merge is not base + scaling x B @ A: refused, each with what it is
UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "a LoRA bias",
    "layer_replication": "layer replication",
    "target_parameters": "adapters on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QALoRA",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
}
ADVICE = "merge it with peft's merge_and_unload() and give the merged model folder instead"


def is_adapter(folder) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def pattern_key(patterns, module: str) -> str | None:
    """The first key of `patterns` that names `module` (a dotted suffix, as a regex), as peft matches them."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its A and B tensors in the adapter file, scaling, and whether B @ A is transposed."""

    a: str
    b: str
    scaling: float
    transpose: bool
    embedding: bool


def read_adapter_config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DppaError(f"{path}: invalid JSON ({exc}); fix or re-download the adapter") from None
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise DppaError(
            f"{path}: peft_type {config.get('peft_type')!r} adapters are not supported (LORA only); {ADVICE}"
        )
    for key, what in UNSUPPORTED.items():
        if config.get(key) not in (None, False, {}, [], "none"):
            raise DppaError(f"{path}: {what} ({key}) is not supported; {ADVICE}")
    if config.get("bias", "none") != "none":
        raise DppaError(f"{path}: bias={config['bias']!r} (trained biases) is not supported; {ADVICE}")
    return config


class AdapterModel(CheckpointReader):
    """The fine-tuned model `base` + LoRA adapter at `folder`, read tensor by tensor like a model folder."""

    def __init__(self, folder: Path, base: CheckpointReader, allow_pickle: bool = False):
        self.adapter_config = read_adapter_config(folder)
        self.weights = open_checkpoint(folder, allow_pickle)
        self.base = base
        self.lora: dict[str, LoraModule] = {}
        self.replaced: dict[str, str] = {}  # base tensor name -> the adapter's full copy of it
        infos = dict(base._infos)
        names = self.weights.names()
        is_lora = [any(n.endswith(suffix) for suffix in LORA_PARTS) for n in names]
        for name in [n for n, lora in zip(names, is_lora) if not lora] + [n for n, lora in zip(names, is_lora) if lora]:
            self._add(name, base, infos)  # full copies first: an adapted embedding's copy sets its shape
        super().__init__(folder, infos)
        self.config = base.config
        self._cached: tuple[str, torch.Tensor] | None = None
        self._compute_lock = threading.Lock()

    # -- the adapter's tensors, mapped onto the base's -----------------------------------------------------------
    def _add(self, name: str, base: CheckpointReader, infos: dict[str, TensorInfo]) -> None:
        file = self.weights.info(name).file
        if not name.startswith(PREFIX):
            raise DppaError(f"{file}: tensor {name!r} does not start with {PREFIX!r}; not a PEFT adapter file")
        key = name[len(PREFIX) :]
        if key.endswith(".lora_magnitude_vector") or ".lora_magnitude_vector." in key:
            raise DppaError(f"{file}: {name!r} is a DoRA magnitude; DoRA is not supported; {ADVICE}")
        if key.endswith(".lora_B.bias"):
            raise DppaError(f"{file}: {name!r} is a LoRA bias, which is not supported; {ADVICE}")
        for suffix, (part, embedding) in LORA_PARTS.items():
            if key.endswith(suffix):
                if part == "A":
                    self._add_lora(key[: -len(suffix)], suffix, embedding, base, infos)
                elif name.replace(suffix, suffix.replace("_B", "_A")) not in self.weights:
                    raise DppaError(f"{file}: {name!r} has no matching lora_A; the adapter file is incomplete")
                return
        target = self._base_name(key[: -len(BASE_LAYER)] + ".weight" if key.endswith(BASE_LAYER) else key, file)
        self.replaced[target] = name
        info = self.weights.info(name)
        infos[target] = TensorInfo(info.file, info.dtype, info.shape, info.offset)

    def _add_lora(self, module: str, suffix: str, embedding: bool, base: CheckpointReader, infos) -> None:
        a_name = PREFIX + module + suffix
        b_name = a_name.replace(suffix, suffix.replace("_A", "_B"))
        file = self.weights.info(a_name).file
        if b_name not in self.weights:
            raise DppaError(f"{file}: {a_name!r} has no matching lora_B; the adapter file is incomplete")
        a_shape, b_shape = self.weights.shape(a_name), self.weights.shape(b_name)
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise DppaError(
                f"{file}: {module}: lora_A {list(a_shape)} and lora_B {list(b_shape)} are not the two factors of a "
                "matrix (convolution adapters are not supported)"
            )
        config = self.adapter_config
        r_key = pattern_key(config.get("rank_pattern") or {}, module)
        alpha_key = pattern_key(config.get("alpha_pattern") or {}, module)
        r = (config.get("rank_pattern") or {}).get(r_key, config.get("r", 8))
        alpha = (config.get("alpha_pattern") or {}).get(alpha_key, config.get("lora_alpha", 8))
        if a_shape[0] != r:
            raise DppaError(
                f"{file}: {module}: lora_A has rank {a_shape[0]} but {ADAPTER_CONFIG} gives r={r} for it; the config "
                "does not match the weights"
            )
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        transpose = embedding or bool(config.get("fan_in_fan_out"))
        target = self._base_name(module + ".weight", file)
        rows, cols = (a_shape[1], b_shape[0]) if transpose else (b_shape[0], a_shape[1])
        shape = infos[target].shape
        if (rows, cols) != tuple(shape):
            raise DppaError(
                f"{file}: {module}: the adapter's update is {rows} x {cols} but the base's {target!r} is "
                f"{' x '.join(map(str, shape))}; the adapter was trained on another base"
            )
        self.lora[target] = LoraModule(a_name, b_name, scaling, transpose, embedding)
        infos[target] = dataclasses.replace(infos[target], file=file)  # errors about it name the adapter

    def _base_name(self, tensor: str, file: Path) -> str:
        """The base's tensor for an adapter's tensor name: the same name, or the one base name whose module path
        ends with it or is ended by it (an adapter trained on `LlamaModel` lacks `model.`, GPT-2's hub names lack
        `transformer.`)."""
        names = self.base._infos
        if tensor in names:
            return tensor
        found = [n for n in names if n.endswith("." + tensor) or tensor.endswith("." + n)]
        if len(found) == 1:
            return found[0]
        what = "no tensor" if not found else f"{len(found)} tensors ({', '.join(found[:3])})"
        raise DppaError(
            f"{file}: the adapter's {tensor!r} matches {what} of the base ({self.base.folder}); the adapter was "
            "trained on another model"
        )

    # -- data -----------------------------------------------------------------------------------------------------
    def read_flat(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        if name not in self.lora and name not in self.replaced:
            return self.base.read_flat(name, start, count)
        numel = self.info(name).numel
        count = numel - start if count is None else count
        return self._tensor(name)[start : start + count].clone()

    def bits_view(self, name: str, start: int, count: int):
        if name not in self.lora and name not in self.replaced:
            return self.base.bits_view(name, start, count)
        return None  # computed here, not stored

    def _tensor(self, name: str) -> torch.Tensor:
        """The fine-tuned tensor `name`, flat, computed once while chunk workers read it."""
        with self._compute_lock:
            if self._cached is None or self._cached[0] != name:
                self._cached = None  # release the previous tensor first
                self._cached = (name, self._compute(name).reshape(-1))
            return self._cached[1]

    def _compute(self, name: str) -> torch.Tensor:
        """What peft's merge writes: weight + scaling x B @ A (transposed for Conv1D and embeddings), B @ A in
        float32; a linear layer adds the float32 update to the weight and rounds once, an embedding rounds the
        update to the weight's dtype first (peft's Linear.merge and Embedding.merge)."""
        weight = self.weights.get(self.replaced[name]) if name in self.replaced else self.base.get(name)
        module = self.lora.get(name)
        if module is None:
            return weight
        update = self.weights.get(module.b, torch.float32) @ self.weights.get(module.a, torch.float32)
        if module.transpose:
            update = update.T
        update = update * module.scaling
        if module.embedding:
            update = update.to(weight.dtype)
        return (weight.to(torch.float32) + update.to(torch.float32)).to(weight.dtype)

    def changed(self) -> list[str]:
        """The tensors the adapter changes (every other one reads as the base)."""
        return sorted({*self.lora, *self.replaced})

    def provenance(self) -> dict:
        """What the manifest records of the adapter beside the fine-tune's content hash."""
        config = self.adapter_config
        return {
            "adapter": {
                "peft_type": "LORA",
                "base_model_name_or_path": config.get("base_model_name_or_path"),
                "r": config.get("r"),
                "lora_alpha": config.get("lora_alpha"),
                "use_rslora": bool(config.get("use_rslora")),
                "adapted": sorted(self.lora),
                "replaced": sorted(self.replaced),
            }
        }

    def close(self) -> None:  # also when __init__ refused the adapter half-way
        if hasattr(self, "weights"):
            self.weights.close()
        if hasattr(self, "_handles"):
            super().close()


def open_finetune(folder, base: CheckpointReader, allow_pickle: bool = False) -> CheckpointReader:
    """A fine-tuned model folder, or a LoRA adapter folder read as the model it describes on `base`."""
    folder = Path(folder)
    if is_adapter(folder):
        return AdapterModel(folder, base, allow_pickle)
    return open_checkpoint(folder, allow_pickle)


def open_model(folder, base=None, allow_pickle: bool = False) -> CheckpointReader:
    """A model folder, or an adapter folder read as its model on the base folder `base` (required then)."""
    if not is_adapter(folder):
        return open_checkpoint(folder, allow_pickle)
    if base is None:
        raise DppaError(f"{folder}: is a LoRA adapter; reading it as a model needs its base model folder")
    return AdapterModel(Path(folder), open_checkpoint(base, allow_pickle), allow_pickle)


def provenance(reader: CheckpointReader) -> dict:
    return reader.provenance() if isinstance(reader, AdapterModel) else {}
