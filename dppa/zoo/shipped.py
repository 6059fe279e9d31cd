"""Pre-trained bases shipped with dppa, so that a zoo of a small size fine-tunes one instead of pre-training it.

Pre-training is most of a first `make demo` (330 of its 640 s on a 2-core machine, 2026-12-04); cheaper recipes
missed the light regime's targets (the base must already hold the skills). So the base of (default, seed 0), the
demo's, is shipped in dppa/zoo/bases/default-s0/, as `dppa zoo --pretrain` wrote it on the machine its base.json
names. Pre-training is deterministic on one machine, not across machines: `--pretrain` elsewhere may give other last
bits. Write a new one with `python scripts/ship_zoo_base.py ZOO` (ZOO built with --pretrain).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dppa.io.atomic import atomic_dir

BASES = Path(__file__).resolve().parent / "bases"
RECORD = "base.json"  # beside the model files: the zoo.json entry of the base, and where it was pre-trained


def base_folder(size: str, seed: int) -> Path:
    """Where the shipped base of (size, seed) lives, shipped or not (one naming for the reader and the writer)."""
    return BASES / f"{size}-s{seed}"


def shipped_base(size: str, seed: int) -> Path | None:
    folder = base_folder(size, seed)
    return folder if (folder / RECORD).is_file() else None


def copy_base(shipped: Path, out: Path) -> dict:
    """The shipped base's files into the new folder `out`; returns its zoo.json entry."""
    out.mkdir()
    for path in sorted(shipped.iterdir()):
        if path.name != RECORD:
            shutil.copyfile(path, out / path.name)
    entry = json.loads((shipped / RECORD).read_text())["base"]
    return {**entry, "shipped": f"dppa/zoo/bases/{shipped.name}"}


def ship_base(zoo: Path) -> Path:
    """Make the base of a zoo built with --pretrain the shipped base of its size and seed."""
    import platform

    import torch

    manifest = json.loads((zoo / "zoo.json").read_text())
    if "shipped" in manifest["base"]:
        raise ValueError(f"{zoo}: its base is a shipped one; build the zoo with --pretrain")
    target = base_folder(manifest["size"], manifest["seed"])
    machine = {"machine": platform.machine(), "processor": _cpu_name(), "torch": torch.__version__}
    base = {k: v for k, v in manifest["base"].items() if k != "exact_match"}  # scored again by each build
    timing = {k: manifest["timing"][k] for k in ("pretrain_threads", "base_seconds")}
    record = {"base": base, "pretrained_on": machine, "timing": timing}
    with atomic_dir(target, overwrite=True) as tmp:  # the shipped base is the old one or the new one, never half
        shutil.copytree(zoo / "base", tmp, dirs_exist_ok=True)
        (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return target


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
