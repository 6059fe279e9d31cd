"""Reading delta folders in the tests, independently of dppa's reader: the safetensors library plus numpy's
unpackbits decode the sparse layout as docs/method.md describes it (a bit mask, little bit order, and the kept
values in flat order), and the zero tensors a header lists under dppa_zero (dppa/io/sparse.py) are zeros."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open


def load_delta(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the delta folder as a dense tensor, whether stored dense or sparse, and times its factor
    where the index scales a shared shard (float32 product rounded to the stored dtype, zeros +0.0)."""
    tensors: dict[str, torch.Tensor] = {}
    index = Path(folder) / "model.safetensors.index.json"
    scales = json.loads(index.read_text())["metadata"].get("dppa_scale", {}) if index.exists() else {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            metadata = handle.metadata() or {}
            stored = {name: handle.get_tensor(name) for name in handle.keys()}
        if file.name in scales:
            for name, t in stored.items():
                product = (t.float() * scales[file.name]).to(t.dtype)
                stored[name] = torch.where(product == 0, torch.zeros((), dtype=t.dtype), product)
        shapes = json.loads(metadata.get("dppa_sparse", "{}"))
        for name, shape in shapes.items():
            mask = stored.pop(f"{name}::mask").numpy()
            values = stored.pop(f"{name}::values")
            stored.pop(f"{name}::counts")
            numel = int(np.prod(shape))
            kept = torch.from_numpy(np.unpackbits(mask, bitorder="little")[:numel].astype(bool))
            dense = torch.zeros(numel, dtype=values.dtype)
            dense[kept] = values
            tensors[name] = dense.view(shape)
        tensors.update(stored)
        dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
        for name, (dtype, shape) in json.loads(metadata.get("dppa_zero", "{}")).items():
            tensors[name] = torch.zeros(shape, dtype=dtypes[dtype])
    return tensors
