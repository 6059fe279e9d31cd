"""How far merged outputs lie from the exact TIES merge, and whether mergekit's arithmetic explains its difference.

    python bench/ties_reference.py --checkpoint CKPT --density 0.2 dppa=OUT1 mergekit=OUT2 [name=OUT ...]

CKPT holds base/, ft1/ and ft2/ in bf16 (or fp16); each OUT is a merged model of them (TIES, weight 1 each,
lambda 1). vs_mergekit.py --reference calls this on its own outputs. Two merges are computed here, tensor by tensor,
with plain torch on the state dicts and none of dppa's code:

- exact: each delta is `ft - base` rounded to the checkpoint's dtype (what `dppa extract` stores and what mergekit
  subtracts); the trim keeps the floor(density * n) largest |delta| of each tensor, ties lowest index first; the
  elected sign is the sign of the sum of the kept deltas; the merged delta is the mean of the kept deltas that agree
  with it (0 where none does, or where the sum is exactly 0); `base + merged delta` is computed in float64 and
  rounded once to the checkpoint's dtype. This is the merge docs/method.md defines, correctly rounded.
- mergekit replayed: mergekit 0.1.5's steps (bench/README.md lists them) in its own operation order and dtype, with
  ties kept lowest index first (its trim with a stable argsort): delta, product by the weight, sum, division and
  the final add each rounded to bf16, and a zero sum electing +. If this equals mergekit's own output (run with a
  stable argsort) bit for bit, what separates mergekit from the exact merge is this arithmetic.

For each OUT it prints the share of elements equal to the exact merge, 1 unit in the last place (ulp) from it,
and more than 2 ulps from it, and the largest distance; and the same against mergekit replayed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open


def tensor_files(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {name: folder / f for name, f in json.loads(index.read_text())["weight_map"].items()}
    names: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as handle:
            names.update({k: f for k in handle.keys()})
    return names


def read(files: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(str(files[name]), "pt") as handle:
        return handle.get_tensor(name)


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise count of 16-bit float values between a and b (bit patterns on a monotonic integer line,
    negatives mirrored, so -0.0 and 0.0 are 0 apart)."""

    def line(x: torch.Tensor) -> torch.Tensor:
        bits = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (line(a) - line(b)).abs()


def kept_lowest_index_first(delta: torch.Tensor, k: int) -> torch.Tensor:
    """`delta` with all but its k largest |entries| zeroed; among equal magnitudes the lower index is kept (a stable
    descending sort keeps equal keys in index order)."""
    flat = delta.reshape(-1)
    order = torch.sort(flat.abs().to(torch.float64), descending=True, stable=True).indices[:k]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.reshape(delta.shape)


def correctly_rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 `x` rounded once, to nearest even, to a 16-bit `dtype`. torch converts float64 to bf16 through
    float32, rounding twice; rounding to float32 by "round to odd" first (truncate, then set the last bit where
    inexact) keeps the second rounding exact, since float32 holds more than two bits beyond bf16's and fp16's."""
    single = x.to(torch.float32)
    over = single.to(torch.float64).abs() > x.abs()
    single = torch.where(over, torch.nextafter(single, torch.zeros_like(single)), single)  # toward zero
    inexact = single.to(torch.float64) != x
    single = torch.where(inexact, (single.view(torch.int32) | 1).view(torch.float32), single)
    return single.to(dtype)


@dataclass
class Exact:
    rounded: torch.Tensor  # the exact merge in base's dtype
    value: torch.Tensor  # base + merged delta, float64, before that rounding
    bound: torch.Tensor  # how far a bf16 chain like mergekit's can stray from `value` by rounding alone
    zero_sums: torch.Tensor  # where kept deltas sum to exactly 0: no sign is elected


def exact_ties(base: torch.Tensor, finetunes: list[torch.Tensor], density: float) -> Exact:
    """The exact merge (module docstring).

    The bound: mergekit rounds the sum s of the agreeing deltas, its quotient q = s / count and base + q, each to
    the nearest bf16 (relative error at most u = 2^-8), so its result lies within u (2 |q| + |base + q|) of the
    exact value, to first order; `bound` is twice that, 2u (2 |q| + |base + q|), and dppa's single rounding (u |value|
    from float32's) lies well inside it."""
    k = int(density * base.numel())
    deltas = [kept_lowest_index_first((ft - base).to(torch.float64), k) for ft in finetunes]  # ft - base: rounded
    total = sum(deltas)
    elected = torch.sign(total)
    agreeing = [torch.where(d * elected > 0, d, torch.zeros_like(d)) for d in deltas]
    count = sum((a != 0).to(torch.float64) for a in agreeing)
    merged = sum(agreeing) / count.clamp(min=1)
    value = base.to(torch.float64) + merged
    unit = torch.finfo(base.dtype).eps / 2  # unit roundoff: 2^-8 for bf16, 2^-11 for fp16
    return Exact(
        rounded=correctly_rounded(value, base.dtype),
        value=value,
        bound=2 * unit * (2 * merged.abs() + value.abs()),
        zero_sums=(total == 0) & (sum(d != 0 for d in deltas) > 0),
    )


def mergekit_replay(base: torch.Tensor, finetunes: list[torch.Tensor], density: float) -> torch.Tensor:
    """mergekit 0.1.5's TIES (weights 1, normalize, lambda 1) step by step in base's dtype, ties kept in index
    order."""
    dtype = base.dtype
    k = max(1, int(density * base.numel()))
    trimmed = []
    for ft in finetunes:
        delta = ft.to(dtype) - base  # rounded to dtype
        flat = delta.reshape(-1)
        order = torch.argsort(flat.abs().float(), descending=True, stable=True)[:k]
        mask = torch.zeros_like(flat)
        mask[order] = 1
        trimmed.append((flat * mask).reshape(delta.shape))
    deltas = torch.stack(trimmed)
    weights = torch.ones(len(finetunes), dtype=dtype).reshape(-1, *([1] * base.dim()))
    weighted = deltas * weights
    elected = (weighted.sum(dim=0) >= 0).to(dtype) * 2 - 1  # a zero sum elects +
    agrees = weighted.sign().to(dtype) == elected
    mixed = (weighted * agrees).sum(dim=0)
    divisor = (weights * agrees).sum(dim=0)
    divisor[divisor == 0] = 1
    mixed = mixed / divisor
    return (base + mixed).to(dtype)


class Tally:
    """One output against a reference, summed over tensors: elements at 0, 1 and more than 2 ulps from its rounded
    value, and those farther from its exact value than rounding explains (`Exact.bound`), at the entries whose
    kept deltas sum to 0 and elsewhere."""

    def __init__(self) -> None:
        self.total = self.equal = self.one = self.beyond_two = self.worst = 0
        self.beyond_bound = self.beyond_bound_at_zero_sums = 0
        self.worst_name = ""

    def add(self, name: str, candidate: torch.Tensor, rounded: torch.Tensor, exact: Exact | None = None) -> None:
        apart = ulps_apart(candidate, rounded)
        self.total += apart.numel()
        self.equal += int((apart == 0).sum())
        self.one += int((apart == 1).sum())
        self.beyond_two += int((apart > 2).sum())
        if apart.numel() and int(apart.max()) > self.worst:
            self.worst, self.worst_name = int(apart.max()), name
        if exact is not None:
            beyond = (candidate.to(torch.float64) - exact.value).abs() > exact.bound
            self.beyond_bound += int(beyond.sum())
            self.beyond_bound_at_zero_sums += int((beyond & exact.zero_sums).sum())

    def line(self, bound: bool) -> str:
        def share(n: int) -> str:
            return f"{n / self.total:.4%}"

        text = (
            f"equal {share(self.equal)}, 1 ulp {share(self.one)}, more than 2 ulps {share(self.beyond_two)} "
            f"({self.beyond_two}), largest {self.worst} ulps ({self.worst_name or '-'})"
        )
        if bound:
            text += (
                f"; beyond rounding: {self.beyond_bound}, of them {self.beyond_bound_at_zero_sums} where the kept "
                "deltas sum to 0"
            )
        return text

    def figures(self) -> dict:
        return {
            "elements": self.total,
            "equal": self.equal,
            "one_ulp": self.one,
            "beyond_2_ulps": self.beyond_two,
            "largest_ulps": self.worst,
            "largest_in": self.worst_name,
            "beyond_rounding": self.beyond_bound,
            "beyond_rounding_at_zero_sums": self.beyond_bound_at_zero_sums,
        }


def compare(checkpoint: Path, outputs: dict[str, Path], density: float, log=print) -> dict:
    """Stream the checkpoint and the outputs tensor by tensor; return and print each output's tallies against the
    exact merge and against mergekit replayed."""
    base_files = tensor_files(checkpoint / "base")
    ft_files = [tensor_files(checkpoint / ft) for ft in ("ft1", "ft2")]
    out_files = {label: tensor_files(folder) for label, folder in outputs.items()}
    for label, files in out_files.items():
        if set(files) != set(base_files):
            missing = sorted(set(files) ^ set(base_files))[:3]
            raise SystemExit(f"{outputs[label]}: holds other tensors than {checkpoint / 'base'}, e.g. {missing}")
    replayed = "mergekit replayed"
    against_exact = {label: Tally() for label in [*outputs, replayed]}
    against_replay = {label: Tally() for label in outputs}
    zero_sums = 0
    for name in sorted(base_files):
        base = read(base_files, name)
        if base.dtype not in (torch.bfloat16, torch.float16):
            raise SystemExit(f"{name}: {base.dtype}; this comparison is for 16-bit checkpoints")
        finetunes = [read(files, name) for files in ft_files]
        exact = exact_ties(base, finetunes, density)
        replay = mergekit_replay(base, finetunes, density)
        zero_sums += int(exact.zero_sums.sum())
        against_exact[replayed].add(name, replay, exact.rounded, exact)
        for label, files in out_files.items():
            merged = read(files, name)
            against_exact[label].add(name, merged, exact.rounded, exact)
            against_replay[label].add(name, merged, replay)
    log(
        f"against the exact merge (density {density}, ties lowest index first, rounded once; {zero_sums} entries "
        "whose kept deltas sum to exactly 0, where mergekit elects + and the exact merge keeps nothing):"
    )
    for label, tally in against_exact.items():
        log(f"  {label:22} {tally.line(bound=True)}")
    log("against mergekit replayed in plain torch (its bf16 steps, ties in index order):")
    for label, tally in against_replay.items():
        log(f"  {label:22} {tally.line(bound=False)}")
    return {
        "density": density,
        "zero_sums": zero_sums,
        "against_exact": {label: t.figures() for label, t in against_exact.items()},
        "against_mergekit_replayed": {label: t.figures() for label, t in against_replay.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="folder with base/, ft1/, ft2/")
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--json", type=Path, help="also write the tallies here")
    p.add_argument("outputs", nargs="+", metavar="LABEL=FOLDER", help="merged models to compare")
    args = p.parse_args(argv)
    outputs = {}
    for item in args.outputs:
        label, sep, folder = item.partition("=")
        if not sep or not Path(folder).is_dir():
            p.error(f"{item}: expected LABEL=FOLDER with an existing folder")
        outputs[label] = Path(folder)
    figures = compare(args.checkpoint, outputs, args.density)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
