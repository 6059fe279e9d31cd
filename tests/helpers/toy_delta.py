"""A toy two-layer delta whose DP densities are computed by hand (tests/test_dp.py), and a writer for such deltas."""

import json

import torch

from dppa.io.atomic import atomic_dir
from dppa.io.writer import ShardedWriter
from dppa.sparsify.dp import DPOptions

SCOPE = r"^layers\.(?P<layer>\d+)\.(a|b)\.weight$"


# The values the hand computations below use: the reference's defaults
HAND = DPOptions(lamda=0.08, layer_mult=3.0, module_mult=5.0)


def ones(n, outliers=()):
    t = torch.ones(n)
    for i, v in outliers:
        t[i] = v
    # alternate signs: pruning and statistics must use magnitudes
    return t * torch.tensor([1.0, -1.0]).repeat(n // 2 + 1)[:n]


TOY = {
    "layers.0.a.weight": ones(10, [(9, 10.0)]).view(2, 5),
    "layers.0.b.weight": ones(30).view(3, 10),
    "layers.1.a.weight": ones(10, [(8, 12.0), (9, 12.0)]).view(2, 5),
    "layers.1.b.weight": ones(10, [(9, 30.0)]).view(2, 5),
    "norm.weight": torch.full((4,), 0.5),
}


def write_delta(folder, tensors, manifest=None):
    with atomic_dir(folder) as tmp:
        writer = ShardedWriter(tmp, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()])
        for n, t in tensors.items():
            writer.write(n, t)
        writer.close()
        (tmp / "dppa_manifest.json").write_text(json.dumps(manifest or {"kind": "delta"}))
    return folder
