"""What the pipeline stores per fine-tune, on disk, in a project folder after `make demo` / `dvc repro`.

    python bench/disk_per_finetune.py [PROJECT]        (default: the current folder)

For each fine-tune NAME of params.yaml: its delta, pruned and amplified deltas and fetch record
(data/deltas/NAME, data/pruned/NAME, data/amplified/NAME, data/models/fetched/NAME), in the workspace and the DVC
cache together (the objects dvc.lock names for those outputs, the `.dir` listings included), each inode counted
once: a file hard-linked between the workspace, the cache and the other artifacts costs its size once, and is
charged to the first artifact that holds it, in that order. Columns: the artifact's dense size (its tensors stored
dense, once; a fetch record's files), the bytes it adds, and those as a multiple of the fine-tune's own size (its
weight files, found from the delta's manifest). Then the same for a LLaMA-2-7B bf16 fine-tune (32 layers, hidden
4096, MLP 11008, vocabulary 32000, untied embeddings) at density 0.2, computed from the storage layout
(dppa/io/sparse.py): the delta dense, the pruned and amplified deltas' block matrices in the sparse layout, their
other tensors in the delta's shared shard.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dppa.io import sparse  # noqa: E402
from dppa.io.manifest import read_manifest  # noqa: E402
from dppa.io.reader import open_checkpoint  # noqa: E402

ARTIFACTS = (("delta", "data/deltas"), ("pruned", "data/pruned"), ("amplified", "data/amplified"))
FETCHED = "data/models/fetched"


def lock_outs(project: Path) -> dict[str, str]:
    """{output path: md5 (`....dir` for a folder)} of every stage in dvc.lock."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", []) if "md5" in o}


def cache_path(project: Path, md5: str) -> Path:
    return project / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def files_of(project: Path, rel: str, outs: dict[str, str]) -> list[Path]:
    """The workspace files of output `rel` and the cache objects dvc.lock names for it."""
    folder = project / rel
    found = [p for p in sorted(folder.rglob("*")) if p.is_file()] if folder.is_dir() else []
    if folder.is_file():
        found = [folder]
    md5 = outs.get(rel)
    if md5:
        obj = cache_path(project, md5)
        if obj.exists():
            found.append(obj)
            if md5.endswith(".dir"):
                found += [cache_path(project, e["md5"]) for e in json.loads(obj.read_text())]
    return [p for p in found if p.exists()]


def new_bytes(files: list[Path], seen: set[tuple[int, int]]) -> int:
    """Bytes of the inodes among `files` not in `seen` (which it extends); a symlink counts as its target."""
    total = 0
    for path in files:
        st = os.stat(path)  # follows symlinks: cache.type symlink points the workspace at the cache object
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def measure(project: Path) -> list[tuple[str, str, int, int, int]]:
    """Rows (fine-tune, artifact, dense bytes, bytes added, fine-tune bytes)."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    outs = lock_outs(project)
    rows = []
    for name in params["models"]["finetunes"]:
        delta = project / "data" / "deltas" / name
        finetune = Path(read_manifest(delta)["finetuned"]["path"])
        if not finetune.is_absolute() or not finetune.exists():
            finetune = project / FETCHED / name / "model"
        ft_bytes = weight_bytes(finetune)
        seen: set[tuple[int, int]] = set()
        for label, parent in ARTIFACTS:
            rel = f"{parent}/{name}"
            dense = open_checkpoint(project / rel).total_bytes()
            rows.append((name, label, dense, new_bytes(files_of(project, rel, outs), seen), ft_bytes))
        rel = f"{FETCHED}/{name}"
        record = sum(p.stat().st_size for p in (project / rel).rglob("*") if p.is_file())
        rows.append((name, "fetch record", record, new_bytes(files_of(project, rel, outs), seen), ft_bytes))
    return rows


def llama2_7b(density: float = 0.2) -> tuple[int, int, int]:
    """(fine-tune bytes, delta bytes, pruned or amplified delta bytes) of a LLaMA-2-7B bf16 fine-tune."""
    hidden, mlp, layers, vocab, bf16 = 4096, 11008, 32, 32000, torch.bfloat16
    matrices = [hidden * hidden] * 4 + [hidden * mlp] * 3  # q, k, v, o; gate, up, down
    outside = 2 * vocab * hidden + (2 * layers + 1) * hidden  # embeddings, LM head; norms
    dense = (outside + layers * sum(matrices)) * bf16.itemsize
    pruned = layers * sum(sparse.sparse_nbytes(n, round(density * n), bf16) for n in matrices)  # shared shard linked
    return dense, dense, pruned


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("project", nargs="?", default=".", type=Path)
    args = ap.parse_args()
    rows = measure(args.project.resolve())
    print(f"{'fine-tune':10} {'artifact':13} {'dense MB':>9} {'stored MB':>10} {'x fine-tune':>12}")
    totals: dict[str, list[int]] = {}
    for name, label, dense, stored, ft in rows:
        print(f"{name:10} {label:13} {dense / 1e6:9.3f} {stored / 1e6:10.3f} {stored / ft:12.3f}")
        total = totals.setdefault(name, [0, 0, ft])
        total[0] += dense
        total[1] += stored
    for name, (dense, stored, ft) in totals.items():
        print(f"{name:10} {'total':13} {dense / 1e6:9.3f} {stored / 1e6:10.3f} {stored / ft:12.3f}   "
              f"(fine-tune {ft / 1e6:.3f} MB)")  # fmt: skip
    ft, delta, pruned = llama2_7b()
    stored = delta + 2 * pruned
    print(f"LLaMA-2-7B bf16 at density 0.2, projected: fine-tune {ft / 1e9:.2f} GB; delta {delta / 1e9:.2f} GB + "
          f"pruned {pruned / 1e9:.2f} GB + amplified {pruned / 1e9:.2f} GB = {stored / 1e9:.2f} GB = "
          f"{stored / ft:.3f} x the fine-tune (fetch record: a few KB)")  # fmt: skip


if __name__ == "__main__":
    main()
