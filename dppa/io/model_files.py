"""Non-weight files of a model folder (config, generation config, tokenizer) copied to outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

from dppa.io.manifest import MANIFEST_NAME

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
SKIP_NAMES = {MANIFEST_NAME, "model.safetensors.index.json", "pytorch_model.bin.index.json"}


def copy_model_files(src: Path, dst: Path) -> list[str]:
    """Copy every small non-weight file (config.json, tokenizer*, generation_config.json, ...) from `src`."""
    copied = []
    for path in sorted(Path(src).iterdir()):
        if path.is_file() and path.suffix not in WEIGHT_SUFFIXES and path.name not in SKIP_NAMES:
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied
