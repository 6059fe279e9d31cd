"""The GPU path checked in one go: the engine's `--device cuda` against `--device cpu` on a synthetic checkpoint
(same outputs? how many GB/s against the disk's read rate?), then the demo pipeline run with runtime.device cpu
and again with cuda, on the same zoo, compared stage output by stage output.

    python bench/gpu_check.py                                  # on a GPU machine (about 5 min on 16 cores)
    python bench/gpu_check.py --device cpu --params tiny       # dry run without a GPU: cpu against cpu

Engine (synthetic checkpoint from make_synthetic.py, default 220M bf16), each command once per device, with
the device's start-up (Python, torch, the CUDA context) measured apart and taken off:
  extract   dppa extract BASE FTi -o Di                       (i = 1, 2)
  prune     dppa prune Di -o Pi --method dp --density 0.2
  merge     dppa merge BASE P1 P2 --method ties               (pruned deltas)
  merge-ft  dppa merge BASE FT1 FT2 --method ties --density 0.2   (fine-tuned model folders)
GB/s = bytes of the input files / (wall time - start-up). The disk's rate: the fine-tune's files read once with
O_DIRECT (from the device, bypassing the page cache, where the file system allows it) and once buffered (from the
page cache, where the commands' inputs also are, having just been written or read).

Demo (--demo quick, the default: the demo's params.yaml with the tiny zoo, fixed amplify factors, a 2-point merge
scale grid and 4 evaluation examples; --demo full: the demo's params.yaml as is, several minutes per run): a
project like the repository's is run with `dppa run` on device cpu; a copy keeps its zoo and fetched models, drops
every later output, DVC's run cache and the evaluation cache, and reruns on cuda (task_runner local-gpu-cluster,
one worker per GPU; threads for a cpu dry run). Both runs must have run every stage after the fetches.

Compared (cpu output against the other device's, every tensor): elements bit-identical, zero/nonzero pattern
("mask") differences, and elements more than one unit in the last place of the stored dtype apart
(|a - b| > eps(dtype) * max(|a|, |b|)): "identical", "within rounding" (masks identical, nothing beyond one
ulp) or "differs". Metrics JSON files: equal or not, with the differing values.

Results: OUT/gpu_check.json and OUT/gpu_check.md, where OUT is --out, else $OUT, else bench/out/gpu-check. The
checkpoints and projects go to --work (default bench/out/gpu-check-work). A phase that would pass --budget-s is
stopped and recorded as such; what was measured until then is still written.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from runner import BENCH, DPPA, REPO, bench_env, ensure_checkpoint

sys.path.insert(0, str(REPO))  # the dppa whose outputs are compared (bench_env runs the commands with it too)

GIB = 1024**3
CODE = ("dppa", "flows", "tasks")  # what a project's stages run (dvc.yaml names them as dependencies)
KEPT_ON_RERUN = ("zoo", "fetch_base", "fetch@")  # device-independent stages the second demo run reuses


class OutOfTime(Exception):
    pass


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 5:
            raise OutOfTime("the time budget (--budget-s) is spent")
        return left


def run_timed(cmd: list[str], log: Path, env: dict[str, str], budget: Budget, cwd: Path | None = None) -> dict:
    """Run cmd with its output in `log`; wall time and peak RSS (this command's process tree's largest process)."""
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        deadline = time.monotonic() + budget.left()
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: the command and what it started
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                raise OutOfTime(f"stopped at the time budget: {' '.join(cmd)} (log: {log})")
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))
    return {"wall_s": round(wall, 3), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def folder_bytes(*folders: Path) -> int:
    return sum(f.stat().st_size for folder in folders for f in folder.glob("*.safetensors"))


# -- the disk ---------------------------------------------------------------------------------------------------
def read_rate(files: list[Path], direct: bool) -> float | None:
    """GB/s reading `files` once in 16 MiB pieces; None when O_DIRECT is refused here (tmpfs, overlay ...)."""
    piece = 16 * 1024 * 1024
    buf = mmap.mmap(-1, piece)  # page-aligned, as O_DIRECT needs
    total = 0
    started = time.perf_counter()
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        except OSError:
            return None
        try:
            offset = 0
            while True:
                try:
                    n = os.preadv(fd, [buf], offset)
                except OSError:
                    return None
                if n == 0:
                    break
                offset += n
                total += n
        finally:
            os.close(fd)
    return round(total / (time.perf_counter() - started) / 1e9, 3)


# -- comparing outputs ------------------------------------------------------------------------------------------
def compare_tensors(reference: Path, other: Path) -> dict:
    """Every tensor of two checkpoint folders (dense or sparse), element by element."""
    from dppa.io.reader import open_checkpoint

    with open_checkpoint(reference) as a_reader, open_checkpoint(other) as b_reader:
        names = a_reader.names()
        if sorted(names) != sorted(b_reader.names()):
            return {"verdict": "differs", "why": "different tensor names"}
        elements = identical = mask_differs = beyond_ulp = 0
        max_rel = 0.0
        worst = None
        for name in names:
            a, b = a_reader.get(name), b_reader.get(name)
            if a.shape != b.shape or a.dtype != b.dtype:
                return {"verdict": "differs", "why": f"{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"}
            elements += a.numel()
            same = a == b
            identical += int(same.sum())
            mask_differs += int(((a != 0) != (b != 0)).sum())
            if not a.is_floating_point():
                beyond_ulp += int((~same).sum())
                continue
            a32, b32 = a.float(), b.float()
            scale = torch.maximum(a32.abs(), b32.abs())
            diff = (a32 - b32).abs()
            beyond = int((diff > torch.finfo(a.dtype).eps * scale).sum())
            beyond_ulp += beyond
            rel = float((diff / scale.clamp_min(torch.finfo(torch.float32).tiny)).max()) if a.numel() else 0.0
            if rel > max_rel:
                max_rel, worst = rel, name
    if identical == elements:
        verdict = "identical"
    elif mask_differs == 0 and beyond_ulp == 0:
        verdict = "within rounding"
    else:
        verdict = "differs"
    return {
        "verdict": verdict,
        "elements": elements,
        "not_bit_identical": elements - identical,
        "mask_differs": mask_differs,
        "beyond_1ulp": beyond_ulp,
        "max_rel_diff": max_rel,
        "worst_tensor": worst,
    }


def compare_json(reference: Path, other: Path) -> dict:
    def flat(value, prefix=""):
        if isinstance(value, dict):
            for key, item in value.items():
                yield from flat(item, f"{prefix}{key}.")
        else:
            yield prefix.rstrip("."), value

    a, b = dict(flat(json.loads(reference.read_text()))), dict(flat(json.loads(other.read_text())))
    differing = {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    return {"verdict": "identical" if not differing else "differs", "differing": differing}


# -- the engine -------------------------------------------------------------------------------------------------
def engine_steps(ckpt: Path, out: Path) -> list[tuple[str, list[str], list[Path], Path]]:
    """(label, dppa arguments, input folders, output folder), in the order they run."""
    base, ft1, ft2 = ckpt / "base", ckpt / "ft1", ckpt / "ft2"
    d1, d2, p1, p2 = out / "d1", out / "d2", out / "p1", out / "p2"
    return [
        ("extract ft1", ["extract", str(base), str(ft1)], [base, ft1], d1),
        ("extract ft2", ["extract", str(base), str(ft2)], [base, ft2], d2),
        ("prune d1", ["prune", str(d1), "--method", "dp", "--density", "0.2"], [d1], p1),
        ("prune d2", ["prune", str(d2), "--method", "dp", "--density", "0.2"], [d2], p2),
        ("merge pruned", ["merge", str(base), str(p1), str(p2), "--method", "ties"], [base, p1, p2], out / "m"),
        (
            "merge-ft",
            ["merge", str(base), str(ft1), str(ft2), "--method", "ties", "--density", "0.2"],
            [base, ft1, ft2],
            out / "mft",
        ),
    ]


def startup_s(device: str, env: dict[str, str], work: Path, budget: Budget) -> float:
    """A command's fixed cost on `device`: Python, torch, dppa's CLI and a first tensor there (the CUDA context)."""
    probe = f"import torch, dppa.cli; torch.ones(1, device={device!r}).sum().item()"
    return min(run_timed([sys.executable, "-c", probe], work / "startup.log", env, budget)["wall_s"] for _ in range(2))


def engine(ckpt: Path, work: Path, runs: list[tuple[str, str]], env: dict[str, str], budget: Budget, result: dict):
    """`runs`: (label, device), the first the reference."""
    result["engine"] = {"checkpoint": str(ckpt), "runs": {}, "compare": {}}
    folders = {}
    for label, device in runs:
        out = folders[label] = work / f"engine-{label.replace(' ', '-')}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        fixed = startup_s(device, env, out, budget)
        record = result["engine"]["runs"][label] = {"device": device, "startup_s": fixed, "steps": {}}
        for step, args, inputs, output in engine_steps(ckpt, out):
            cmd = [*DPPA, *args, "-o", str(output), "--device", device, "-q"]
            measured = run_timed(cmd, out / f"{output.name}.log", env, budget)
            read, written = folder_bytes(*inputs), folder_bytes(output)
            net_s = measured["wall_s"] - fixed
            # below half a second the start-up's own spread decides the figure: none is given
            rate = round(read / net_s / 1e9, 3) if net_s >= 0.5 else None
            record["steps"][step] = {
                **measured,
                "net_s": round(net_s, 3),
                "read_gb": round(read / 1e9, 3),
                "written_gb": round(written / 1e9, 3),
                "read_gb_per_s": rate,
            }
            print(f"{label:10} {step:13} {measured['wall_s']:7.2f} s  {rate or '-'} GB/s", flush=True)
    (reference, _), (other, _) = runs[0], runs[-1]
    for _, _, _, output in engine_steps(ckpt, folders[reference]):
        result["engine"]["compare"][output.name] = compare_tensors(output, folders[other] / output.name)


# -- the demo ---------------------------------------------------------------------------------------------------
def quick_params(params: dict) -> dict:
    params["zoo"]["size"] = "tiny"
    params["amplify"] = {"bands": [0.5, 1.0], "factors": [1.8, 1.0]}
    params["merge"]["search"].update(grid=[0.5, 1.0], limit=4)
    params["merge"]["weights"] = None
    params["evaluate"].update(limit=4, batch_size=8)
    return params


def make_project(folder: Path, mode: str) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, folder / name)
    for code in CODE:
        shutil.copytree(REPO / code, folder / code, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if mode == "quick":
        params = quick_params(params)
    params["runtime"].update(device="cpu", task_runner="threads", concurrency=min(4, os.cpu_count() or 1))
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=folder, check=True, capture_output=True)
    return folder


def rerun_copy(source: Path, folder: Path, device: str, gpus: int) -> Path:
    """A copy of a finished project that keeps the zoo and the fetched models and must recompute the rest."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(source, folder, symlinks=True)
    lock_path = folder / "dvc.lock"
    lock = yaml.safe_load(lock_path.read_text())
    lock["stages"] = {name: entry for name, entry in lock["stages"].items() if name.startswith(KEPT_ON_RERUN)}
    lock_path.write_text(yaml.safe_dump(lock, sort_keys=False))
    for path in (folder / "data").iterdir():
        if path.name != "models":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    # runtime.device is no stage parameter: DVC's run cache would restore the first run's outputs
    shutil.rmtree(folder / ".dvc" / "cache" / "runs", ignore_errors=True)
    params = yaml.safe_load((folder / "params.yaml").read_text())
    runner = "local-gpu-cluster" if device == "cuda" else "threads"
    params["runtime"].update(device=device, task_runner=runner, gpu_concurrency=max(1, gpus))
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder


def run_project(project: Path, env: dict[str, str], log: Path, budget: Budget) -> dict:
    """`dppa run` on a project with its own code; wall time, peak RSS and each stage's outcome."""
    project_env = dict(env, PYTHONPATH=str(project))
    project_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # `dppa stage`
    measured = run_timed([*DPPA, "run", "-C", str(project)], log, project_env, budget)
    record = json.loads((project / "data" / "runs" / "latest.json").read_text())
    return {**measured, "stages": record.get("stages", {})}


def demo(mode: str, work: Path, other: str, env: dict[str, str], budget: Budget, result: dict) -> None:
    section = result["demo"] = {"mode": mode, "runs": {}, "compare": {}}
    reference = "cpu"
    first = make_project(work / f"demo-{reference}", mode)
    section["runs"][reference] = run_project(first, env, work / f"demo-{reference}.log", budget)
    print(f"demo {reference}: {section['runs'][reference]['wall_s']:.0f} s", flush=True)
    rerun = rerun_copy(first, work / f"demo-{other}-rerun", other, torch.cuda.device_count())
    label = f"{other} (rerun)"
    section["runs"][label] = run_project(rerun, env, work / f"demo-{other}-rerun.log", budget)
    print(f"demo {label}: {section['runs'][label]['wall_s']:.0f} s", flush=True)
    outcome = section["runs"][label]["stages"]
    section["rerun_not_run"] = [s for s, o in outcome.items() if not s.startswith(KEPT_ON_RERUN) and o != "ran"]
    section["rerun_complete"] = bool(outcome) and not section["rerun_not_run"]
    section["compare"] = compare_projects(first / "data", rerun / "data")


def compare_projects(first: Path, rerun: Path) -> dict:
    """The tensor outputs (deltas, pruned, amplified, merged) and the metrics of two runs' data folders."""
    compared = {}
    for sub in ("deltas", "pruned", "amplified", "merged"):
        for folder in sorted(f for f in (first / sub).iterdir() if f.is_dir()):
            compared[f"{sub}/{folder.name}"] = compare_tensors(folder, rerun / sub / folder.name)
    for path in sorted((first / "metrics").rglob("*.json")):
        relative = path.relative_to(first)
        compared[str(relative)] = compare_json(path, rerun / relative)
    return compared


# -- the report -------------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    lines = [
        f"# GPU check ({result['started']})",
        "",
        f"- machine: {result['machine']}",
        f"- command: `{result['command']}`",
    ]
    disk = result.get("disk")
    if disk:
        lines.append(
            f"- disk read of {disk['gb']} GB (one fine-tune's files): O_DIRECT {disk['direct_gb_per_s']} GB/s, "
            f"buffered (page cache) {disk['buffered_gb_per_s']} GB/s"
        )
    engine_ = result.get("engine")
    if engine_ and engine_["runs"]:
        devices = list(engine_["runs"])
        lines += ["", "## Engine", "", "| step | read GB | " + " | ".join(f"{d} s | {d} GB/s" for d in devices) + " |"]
        lines.append("|---|---|" + "---|---|" * len(devices))
        steps = engine_["runs"][devices[0]]["steps"]
        for step, first in steps.items():
            cells = []
            for d in devices:
                s = engine_["runs"][d]["steps"].get(step)
                rate = "-" if not s or s["read_gb_per_s"] is None else f"{s['read_gb_per_s']:.2f}"
                cells += [f"{s['wall_s']:.2f}" if s else "-", rate]
            lines.append(f"| {step} | {first['read_gb']} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(
            "start-up taken off: " + ", ".join(f"{d} {engine_['runs'][d]['startup_s']:.2f} s" for d in devices)
        )
        lines += compare_lines(engine_.get("compare", {}), f"{devices[0]} vs {devices[-1]}")
    demo_ = result.get("demo")
    if demo_:
        lines += ["", f"## Demo ({demo_['mode']})", ""]
        for label, run in demo_["runs"].items():
            ran = sum(o == "ran" for o in run["stages"].values())
            lines.append(f"- {label}: {run['wall_s']:.0f} s, {ran} of {len(run['stages'])} stages ran")
        if "rerun_complete" in demo_:
            lines.append(
                f"- the rerun recomputed every stage after the fetches: {demo_['rerun_complete']}"
                + (f" (not: {', '.join(demo_['rerun_not_run'])})" if demo_["rerun_not_run"] else "")
            )
        lines += compare_lines(demo_.get("compare", {}), "first run vs rerun")
    if result.get("stopped"):
        lines += ["", f"**Stopped:** {result['stopped']}"]
    return "\n".join(lines) + "\n"


def compare_lines(compared: dict, title: str) -> list[str]:
    if not compared:
        return []
    lines = [
        "",
        f"Outputs, {title}:",
        "",
        "| output | verdict | not bit-identical | mask differs | beyond 1 ulp | max rel diff |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for name, c in compared.items():
        if "elements" in c:
            lines.append(
                f"| {name} | {c['verdict']} | {c['not_bit_identical']} of {c['elements']} | {c['mask_differs']} | "
                f"{c['beyond_1ulp']} | {c['max_rel_diff']:.2e} |"
            )
        else:
            detail = c.get("why") or json.dumps(c.get("differing", {}))[:200]
            lines.append(f"| {name} | {c['verdict']} | {detail} | | | |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--device", default="cuda", choices=["cuda", "cpu"], help="compared against cpu (cpu: a dry run)"
    )
    parser.add_argument("--params", default="220M", help="make_synthetic.py preset (default 220M)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--demo", default="quick", choices=["quick", "full", "none"])
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every command (default: torch's own)")
    parser.add_argument("--budget-s", type=float, default=480, help="stop what runs past this (default 480)")
    parser.add_argument("--work", type=Path, default=BENCH / "out" / "gpu-check-work")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or BENCH / "out" / "gpu-check"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu for a dry run")
    budget = Budget(args.budget_s)
    # the reference on cpu, then the device checked (cpu again for a dry run)
    runs = [("cpu", "cpu"), (args.device if args.device != "cpu" else "cpu again", args.device)]
    env = bench_env(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    result = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": f"{os.cpu_count()} cores, {gpu} x{torch.cuda.device_count()}, torch {torch.__version__}",
    }
    try:
        ckpt = ensure_checkpoint(args.work, args.params, args.dtype, seed=0)
        files = sorted((ckpt / "ft1").glob("*.safetensors"))
        result["disk"] = {
            "gb": round(sum(f.stat().st_size for f in files) / 1e9, 3),
            "direct_gb_per_s": read_rate(files, direct=True),
            "buffered_gb_per_s": read_rate(files, direct=False),
        }
        engine(ckpt, args.work, runs, env, budget, result)
        if args.demo != "none":
            demo(args.demo, args.work, args.device, env, budget, result)
    except OutOfTime as stop:
        result["stopped"] = str(stop)
    except BaseException as failure:  # what was measured until then is still written
        result["stopped"] = f"failed: {failure!r}"
        raise
    finally:
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))
        (args.out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
