"""Delta storage on a checkpoint of realistic shape: sparse against dense file sizes, read times, and what storing
deltas in the source dtype (bf16) instead of float32 changes in the merged model.

    python bench/delta_storage.py --params 220M --layers 2 --density 0.2

Makes (or reuses) bench/out/syn-PARAMS-Lk-bf16 with bench/make_synthetic.py, then for two fine-tunes:
- extracts each delta twice, `--dtype source` (bf16) and `--dtype float32`;
- prunes the bf16 delta with DP at --density, written sparse and dense, and amplifies it (factors 1.8, 1.0);
- prints the sizes on disk and their ratio to the dense bf16 delta, the same for the bytes not hard-linked to the
  delta's files (the shared shard of dppa/io/sparse.py is the delta's), and the time to read each folder chunk by
  chunk (the merge's access pattern, one thread), best of 3, from page cache and from disk (the files dropped from
  the page cache before each read with posix_fadvise DONTNEED);
- merges (TIES of the two DP-pruned deltas) from the bf16 and from the float32 deltas, and prints the largest
  |weight| and |logit| difference between the two merged models (logits of 4 x 64 random tokens, float32).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.runner import evict  # noqa: E402
from dppa.extract import extract_delta  # noqa: E402
from dppa.io.manifest import read_manifest  # noqa: E402
from dppa.io.reader import open_checkpoint  # noqa: E402
from dppa.merging.merge import merge_deltas  # noqa: E402
from dppa.sparsify.bands import amplify_delta  # noqa: E402
from dppa.sparsify.prune import prune_delta  # noqa: E402


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def unshared_bytes(folder: Path, delta: Path) -> int:
    """Bytes of `folder`'s weight files that are not hard links to the delta's (its shared shard is the delta's)."""
    linked = {p.stat().st_ino for p in delta.glob("*.safetensors")}
    return sum(p.stat().st_size for p in folder.glob("*.safetensors") if p.stat().st_ino not in linked)


def read_seconds(folder: Path, chunk: int = 1 << 18, *, cold: bool = False) -> float:
    best = float("inf")
    for _ in range(3):
        if cold:
            evict(folder)
        reader = open_checkpoint(folder)
        start = time.perf_counter()
        for name in reader.names():
            for _ in reader.iter_chunks(name, chunk):
                pass
        best = min(best, time.perf_counter() - start)
        reader.close()
    return best


def max_logit_diff(a: Path, b: Path) -> float:
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(0))
    logits = []
    for folder in (a, b):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            logits.append(model(ids).logits)
    return float((logits[0] - logits[1]).abs().max())


def max_weight_diff(a: Path, b: Path) -> float:
    ra, rb = open_checkpoint(a), open_checkpoint(b)
    return max(float((ra.get(n, torch.float32) - rb.get(n, torch.float32)).abs().max()) for n in ra.names())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="220M")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--density", type=float, default=0.2)
    args = ap.parse_args()
    syn = ROOT / "bench" / "out" / f"syn-{args.params}-L{args.layers}-bf16"
    if not (syn / "ft2").exists():
        subprocess.run(
            [sys.executable, str(ROOT / "bench" / "make_synthetic.py"), str(syn), "--params", args.params,
             "--layers", str(args.layers), "--dtype", "bf16", "--finetunes", "2", "--seed", "0"],
            check=True,
        )  # fmt: skip
    work = ROOT / "bench" / "out" / "delta_storage"
    kw = {"overwrite": True, "progress": False}
    rows, pruned = [], {}
    for ft in ("ft1", "ft2"):
        for dtype in ("source", "float32"):
            extract_delta(syn / "base", syn / ft, work / f"delta-{ft}-{dtype}", dtype=dtype, **kw)
            pruned[ft, dtype] = prune_delta(
                work / f"delta-{ft}-{dtype}", work / f"pruned-{ft}-{dtype}", method="dp", density=args.density, **kw
            )
    delta = work / "delta-ft1-source"
    dense = prune_delta(delta, work / "pruned-dense", method="dp", density=args.density, storage="dense", **kw)
    amp = amplify_delta(delta, work / "amplified", densities=[args.density / 2, args.density], factors=[1.8, 1.0], **kw)
    dense_bytes = folder_bytes(delta)
    for label, folder in [
        ("delta, dense bf16 (extract)", delta),
        ("delta, dense float32", work / "delta-ft1-float32"),
        (f"DP-pruned d={args.density}, dense bf16", dense),
        (f"DP-pruned d={args.density}, sparse bf16", pruned["ft1", "source"]),
        (f"amplified d={args.density}, sparse bf16", amp),
    ]:
        size, own = folder_bytes(folder), unshared_bytes(folder, delta) if folder != delta else folder_bytes(folder)
        warm, cold = read_seconds(folder), read_seconds(folder, cold=True)
        rows.append((label, size, size / dense_bytes, own / dense_bytes, warm, cold))
    reader = open_checkpoint(pruned["ft1", "source"])
    infos = [reader.info(n) for n in read_manifest(reader.folder)["module_density"]]  # the pruned tensors
    in_scope = sum(i.stored_bytes for i in infos) / sum(i.nbytes for i in infos)
    # LLaMA-2-7B: 6.74 B parameters, of which embeddings + LM head (kept dense, outside the pruning scope) 2 x 32000
    # x 4096 and norms 0.27 M; the block matrices are pruned
    outside = (2 * 32000 * 4096 + 65 * 4096) / 6.738e9
    print(f"pruned block matrices alone: {in_scope:.3f} x their dense size; projected pruned delta of LLaMA-2-7B: "
          f"{outside + (1 - outside) * in_scope:.3f} x dense, of which {(1 - outside) * in_scope:.3f} not shared "
          "with the delta")  # fmt: skip
    print(f"checkpoint {syn.name}: {open_checkpoint(syn / 'base').total_bytes() / 1e6:.1f} MB of weights")
    print(f"{'artifact':42} {'MB':>9} {'x dense bf16':>13} {'not shared':>11} {'cached s':>9} {'disk s':>8}")
    for label, size, ratio, own, warm, cold in rows:
        print(f"{label:42} {size / 1e6:9.2f} {ratio:13.3f} {own:11.3f} {warm:9.3f} {cold:8.3f}")
    merged = {
        dtype: merge_deltas(
            syn / "base", [pruned["ft1", dtype], pruned["ft2", dtype]], work / f"merged-{dtype}", method="ties", **kw
        )
        for dtype in ("source", "float32")
    }
    print(f"TIES of the DP-pruned deltas, bf16 vs float32 deltas: max |weight diff| "
          f"{max_weight_diff(merged['source'], merged['float32']):.3g}, max |logit diff| "
          f"{max_logit_diff(merged['source'], merged['float32']):.3g}")  # fmt: skip


if __name__ == "__main__":
    main()
