"""Where tensor math runs, and progress reporting for checkpoint walks."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from dppa.errors import DppaError

DEFAULT_CHUNK_ELEMS = 1 << 24  # 16 M elements: 64 MB of float32 per buffer


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DppaError(f"--device {name}: no CUDA device is visible here; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise DppaError(f"--device {name}: unknown device; use auto, cpu or cuda")
    return torch.device(name)


class Progress:
    """A byte-counting progress bar that also shows tensors done; silent when disabled."""

    def __init__(self, desc: str, total_bytes: int, total_tensors: int, enabled: bool = True):
        self.total_tensors = total_tensors
        self.done = 0
        self.bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                        disable=not enabled, dynamic_ncols=True, mininterval=0.5, leave=True)

    def advance(self, nbytes: int) -> None:
        self.bar.update(nbytes)

    def tensor_done(self) -> None:
        self.done += 1
        self.bar.set_postfix_str(f"{self.done}/{self.total_tensors} tensors", refresh=False)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
