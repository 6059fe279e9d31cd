"""dppa against mergekit 0.1.5 on the same synthetic checkpoint: wall time, peak RSS, and agreement of the outputs.

    python bench/vs_mergekit.py --params 220M --dtype bf16 --runs 3
    python bench/vs_mergekit.py --params 220M --dtype fp32 --runs 3      # also checks element agreement
    python bench/vs_mergekit.py --checkpoint CKPT --dtype bf16 --runs 3   # CKPT/base, ft1, ft2: a real checkpoint

What is timed (each under /usr/bin/time -v, runs interleaved, median reported):
  mergekit      mergekit-yaml with merge_method ties, base + two fine-tunes, density 0.2, weight 1.0,
                normalize true, dtype = the checkpoint's (mergekit reads the models and trims inside the merge)
  dppa models   `dppa merge BASE FT1 FT2 --method ties --density 0.2`: the same inputs as mergekit, model
                folders, each delta taken on the fly (the like-for-like comparison; agreement is checked on it)
  dppa merge    `dppa merge BASE D1 D2 --method ties --density 0.2`, on deltas made beforehand by `dppa extract`
                (outside the timing: deltas are what a DPPA pipeline keeps anyway)
  dppa e2e      `dppa extract` twice then `dppa merge` of the deltas, timed together (the path from raw models
                before `merge` took model folders); its peak RSS is the largest of the three steps

mergekit lives in its own virtualenv (bench/.venv-mergekit, git-ignored), created on first use with
torch==2.13.0 installed first (so mergekit's torch>=2.0 is satisfied by the CPU build) and then mergekit==0.1.5.
It is never a dependency of the project.

Agreement: the two merged models are read tensor by tensor; an element differs when
|dppa - mergekit| > 1e-5 * max(|dppa|, |mergekit|). On float32 the target is < 0.1% of elements (only magnitude
ties at the trim threshold may fall differently). bf16 outputs may differ by rounding: mergekit computes in bf16
there, dppa in float32; the share more than 2 bf16 ulps apart is reported for them. Ties at the trim threshold are
kept in a different order (dppa: lowest index first; mergekit: torch's CPU argsort, which is not stable);
--stable-ties also compares a mergekit run whose argsort is made stable, to separate that from the arithmetic.
--reference (16-bit checkpoints) measures each output against the exact merge, correctly rounded, and mergekit's
against its own bf16 steps replayed in plain torch (bench/ties_reference.py): where the differences come from.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ties_reference
import torch
from runner import (
    BENCH,
    DPPA,
    REPO,
    Run,
    bench_env,
    combine,
    ensure_checkpoint,
    measure,
    median_run,
    snapshot,
    source_label,
)
from safetensors import safe_open
from ties_reference import tensor_files, ulps_apart

MERGEKIT_VERSION = "0.1.5"
# mergekit-yaml with torch.argsort stable: mergekit's magnitude trim keeps argsort(|delta|, descending)[:k], and
# torch's CPU sort is not stable, so which of the entries equal to the k-th largest it keeps is arbitrary
STABLE_TIES = (
    "import sys, torch; argsort = torch.argsort; "
    "torch.argsort = lambda *a, **k: argsort(*a, **{**k, 'stable': True}); "
    "from mergekit.scripts.run_yaml import main; sys.argv[0] = 'mergekit-yaml'; sys.exit(main())"
)
TORCH_PIN = "torch==2.13.0"
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def ensure_mergekit(venv: Path) -> Path:
    """Return the mergekit-yaml executable, creating the benchmark's own venv on first use."""
    exe = venv / "bin" / "mergekit-yaml"
    py = venv / "bin" / "python"
    if exe.exists() and _installed_version(py, "mergekit") == MERGEKIT_VERSION:
        return exe
    print(f"setting up mergekit {MERGEKIT_VERSION} in {venv} (once)", file=sys.stderr)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [TORCH_PIN], check=True)  # first, so mergekit does not pull a CUDA build
    subprocess.run(pip + [f"mergekit=={MERGEKIT_VERSION}"], check=True)
    torch_version = _installed_version(py, "torch")
    if not torch_version.startswith("2.13.0"):
        raise SystemExit(f"mergekit install replaced torch with {torch_version}; remove {venv} and check pins")
    return exe


def _installed_version(py: Path, package: str) -> str:
    if not py.exists():
        return ""
    out = subprocess.run(
        [str(py), "-c", f"import importlib.metadata as m; print(m.version('{package}'))"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def mergekit_config(ckpt: Path, density: float, dtype: str) -> str:
    models = "".join(
        f"  - model: {ckpt / ft}\n    parameters: {{density: {density}, weight: 1.0}}\n" for ft in ("ft1", "ft2")
    )
    return (
        f"merge_method: ties\nbase_model: {ckpt / 'base'}\nmodels:\n{models}"
        f"parameters:\n  normalize: true\ndtype: {dtype}\n"
    )


def compare(ours: Path, theirs: Path, rtol: float) -> dict:
    """Stream both models tensor by tensor and count elements whose relative difference exceeds rtol."""
    a_files, b_files = tensor_files(ours), tensor_files(theirs)
    if set(a_files) != set(b_files):
        missing = sorted(set(a_files) ^ set(b_files))[:5]
        raise SystemExit(f"outputs hold different tensors, e.g. {missing}")
    total = differing = exact = beyond_ulps = 0
    worst = {"name": None, "share": 0.0}
    max_abs = 0.0
    for name in sorted(a_files):
        with safe_open(str(a_files[name]), "pt") as fa, safe_open(str(b_files[name]), "pt") as fb:
            a, b = fa.get_tensor(name), fb.get_tensor(name)
        if a.shape != b.shape:
            raise SystemExit(f"{name}: shape {tuple(a.shape)} (dppa) vs {tuple(b.shape)} (mergekit)")
        exact += int((a == b).sum())
        if a.dtype == b.dtype == torch.bfloat16:
            beyond_ulps += int((ulps_apart(a, b) > 2).sum())
        a, b = a.float(), b.float()
        diff = (a - b).abs()
        bad = int((diff > rtol * torch.maximum(a.abs(), b.abs())).sum())
        total += a.numel()
        differing += bad
        max_abs = max(max_abs, float(diff.max()))
        if bad / a.numel() > worst["share"]:
            worst = {"name": name, "share": bad / a.numel()}
    return {
        "elements": total,
        "differing": differing,
        "share_differing": differing / total,
        "not_bit_identical": total - exact,
        "share_beyond_2_bf16_ulps": beyond_ulps / total,  # 0 unless bf16: "equal within bf16 rounding" where small
        "max_abs_diff": max_abs,
        "worst_tensor": worst,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="220M", help="make_synthetic.py preset (220M, 1B, ...)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_NAMES))
    p.add_argument("--checkpoint", type=Path, help="use this folder (base/, ft1/, ft2/) instead of generating one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, help="OMP/MKL threads for both tools (default: their own, all cores)")
    p.add_argument("--at", metavar="COMMIT", help="run dppa as of this commit (default: the working tree)")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--mergekit-dtype", help="mergekit's computation dtype (default: the checkpoint's)")
    p.add_argument("--no-e2e", action="store_true", help="skip the extract+merge end-to-end timing")
    p.add_argument(
        "--no-deltas", action="store_true", help="time mergekit and dppa from model folders only (no extract at all)"
    )
    p.add_argument("--mergekit-only", action="store_true", help="time mergekit alone (no dppa, no comparison)")
    p.add_argument(
        "--stable-ties",
        action="store_true",
        help="also run mergekit once (untimed) with torch.argsort made stable, so that the ties at its trim threshold "
        "are kept lowest index first as dppa keeps them, and compare that output too",
    )
    p.add_argument(
        "--reference",
        action="store_true",
        help="16-bit checkpoints: also measure each output's distance from the exact merge, and mergekit's from its "
        "own bf16 steps replayed in plain torch (bench/ties_reference.py; implies --stable-ties)",
    )
    p.add_argument("--work", type=Path, default=BENCH / "out", help="where checkpoints and outputs go")
    p.add_argument("--venv", type=Path, default=BENCH / ".venv-mergekit")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--keep", action="store_true", help="keep merged outputs and deltas")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mergekit_yaml = ensure_mergekit(args.venv)
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = (args.checkpoint or ensure_checkpoint(args.work, args.params, args.dtype, args.seed)).resolve()
    run_dir = (args.work / f"vs-{ckpt.name}").resolve()
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    src = snapshot(args.at, args.work) if args.at else REPO
    env = bench_env(args.threads, src)
    dppa = DPPA
    mk_dtype = args.mergekit_dtype or DTYPE_NAMES[args.dtype]
    config = run_dir / "mergekit.yml"
    config.write_text(mergekit_config(ckpt, args.density, mk_dtype))

    base, fts = ckpt / "base", [ckpt / "ft1", ckpt / "ft2"]
    deltas = [run_dir / f"delta{i}" for i in (1, 2)]
    for ft, delta in zip(fts, deltas):  # untimed preparation for the "dppa merge" variant
        if args.mergekit_only or args.no_deltas:
            break
        measure(dppa + ["extract", str(base), str(ft), "-o", str(delta)], run_dir / f"{delta.name}.log", env)

    mk_out, dppa_out = run_dir / "merged-mergekit", run_dir / "merged-dppa"
    results: dict[str, list[Run]] = {"mergekit": [], "dppa models": [], "dppa merge": [], "dppa e2e": []}
    for i in range(args.runs):
        for path in (mk_out, dppa_out):
            shutil.rmtree(path, ignore_errors=True)
        results["mergekit"].append(
            measure(
                [str(mergekit_yaml), str(config), str(mk_out), "--no-write-model-card", "--quiet"],
                run_dir / f"mergekit-{i}.log",
                env,
            )
        )
        if args.mergekit_only:
            print(f"run {i + 1}/{args.runs}: mergekit {results['mergekit'][-1].wall_s:.1f} s", file=sys.stderr)
            continue
        shutil.rmtree(dppa_out, ignore_errors=True)
        results["dppa models"].append(
            measure(
                dppa
                + ["merge", str(base), *map(str, fts), "-o", str(dppa_out), "--method", "ties"]
                + ["--density", str(args.density)],
                run_dir / f"dppa-models-{i}.log",
                env,
            )
        )
        if args.no_deltas:
            print(
                f"run {i + 1}/{args.runs}: " + ", ".join(f"{k} {v[-1].wall_s:.1f} s" for k, v in results.items() if v),
                file=sys.stderr,
            )
            continue
        deltas_out = run_dir / "merged-dppa-deltas"
        shutil.rmtree(deltas_out, ignore_errors=True)
        results["dppa merge"].append(
            measure(
                dppa
                + [
                    "merge",
                    str(base),
                    *map(str, deltas),
                    "-o",
                    str(deltas_out),
                    "--method",
                    "ties",
                    "--density",
                    str(args.density),
                ],
                run_dir / f"dppa-merge-{i}.log",
                env,
            )
        )
        if not args.no_e2e:
            e2e = run_dir / "e2e"
            shutil.rmtree(e2e, ignore_errors=True)
            e2e.mkdir()
            steps = [
                measure(
                    dppa + ["extract", str(base), str(ft), "-o", str(e2e / f"d{j}")],
                    run_dir / f"e2e-extract{j}-{i}.log",
                    env,
                )
                for j, ft in enumerate(fts, 1)
            ]
            steps.append(
                measure(
                    dppa
                    + [
                        "merge",
                        str(base),
                        str(e2e / "d1"),
                        str(e2e / "d2"),
                        "-o",
                        str(e2e / "merged"),
                        "--method",
                        "ties",
                        "--density",
                        str(args.density),
                    ],
                    run_dir / f"e2e-merge-{i}.log",
                    env,
                )
            )
            results["dppa e2e"].append(combine(steps))
            shutil.rmtree(e2e)
        print(
            f"run {i + 1}/{args.runs}: " + ", ".join(f"{k} {v[-1].wall_s:.1f} s" for k, v in results.items() if v),
            file=sys.stderr,
        )

    summary = {k: median_run(v) for k, v in results.items() if v}
    mk = summary["mergekit"]
    print(
        f"\ncheckpoint {ckpt} ({args.dtype}), {args.runs} runs, TIES density {args.density}, "
        f"mergekit dtype {mk_dtype}, threads {args.threads or 'default'}, dppa at {source_label(src)}"
    )
    print(
        f"{'':12} {'median wall s':>14} {'median cpu s':>13} {'peak RSS MiB':>12} {'wall x':>8} {'cpu x':>7} "
        f"{'RSS x':>7} {'load':>5}"
    )
    for name, r in summary.items():
        print(
            f"{name:12} {r.wall_s:14.2f} {r.cpu_s:13.2f} {r.peak_rss_mib:12.0f} {mk.wall_s / r.wall_s:8.2f} "
            f"{mk.cpu_s / r.cpu_s:7.2f} {mk.peak_rss_mib / r.peak_rss_mib:7.2f} {r.load_avg:5.1f}"
        )
    print(
        "(wall x, cpu x, RSS x = mergekit / row: above 1 means dppa is faster / smaller; targets wall x >= 5, "
        "RSS x >= 2;\n load = median 1-minute load average at the end of the runs, on "
        f"{os.cpu_count()} cores: above that, other work shared the CPUs and wall times are inflated)"
    )

    agreement = None if args.mergekit_only else compare(dppa_out, mk_out, args.rtol)
    if agreement:
        report_agreement(agreement, args)
    stable = None
    if (args.stable_ties or args.reference) and agreement:
        stable_out = run_dir / "merged-mergekit-stable-ties"
        shutil.rmtree(stable_out, ignore_errors=True)
        measure(
            [str(mergekit_yaml.parent / "python"), "-c", STABLE_TIES, str(config), str(stable_out)]
            + ["--no-write-model-card", "--quiet"],
            run_dir / "mergekit-stable-ties.log",
            env,
        )
        stable = compare(dppa_out, stable_out, args.rtol)
        print("with mergekit's ties at the trim threshold kept in index order, as dppa keeps them (untimed run):")
        report_agreement(stable, args)
    reference = None
    if args.reference and agreement:
        outputs = {"dppa": dppa_out, "mergekit": mk_out, "mergekit stable ties": stable_out}
        reference = ties_reference.compare(ckpt, outputs, args.density)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "checkpoint": str(ckpt),
                    "dtype": args.dtype,
                    "runs": args.runs,
                    "mergekit_dtype": mk_dtype,
                    "threads": args.threads,
                    "dppa_at": source_label(src),
                    "median": {k: vars(v) for k, v in summary.items()},
                    "all": {k: [vars(r) for r in v] for k, v in results.items()},
                    "agreement": agreement,
                    "agreement_with_stable_ties": stable,
                    "reference": reference,
                },
                indent=2,
            )
        )
    if not args.keep:
        shutil.rmtree(run_dir)
    return 0


def report_agreement(agreement: dict, args: argparse.Namespace) -> None:
    print(
        f"agreement: {agreement['share_differing']:.4%} of {agreement['elements']} elements differ by more than "
        f"{args.rtol:g} relative ({agreement['differing']}); {agreement['not_bit_identical']} not bit-identical; "
        f"max |diff| {agreement['max_abs_diff']:.3g}; worst tensor {agreement['worst_tensor']['name']} "
        f"({agreement['worst_tensor']['share']:.4%})"
    )
    if args.dtype == "bf16":
        print(f"more than 2 bf16 ulps apart: {agreement['share_beyond_2_bf16_ulps']:.4%} of elements")
    if args.dtype == "fp32":
        print(f"float32 target < 0.1% differing: {'met' if agreement['share_differing'] < 1e-3 else 'MISSED'}")


if __name__ == "__main__":
    sys.exit(main())
