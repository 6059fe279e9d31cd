"""Shared by the benchmark scripts: run a command under /usr/bin/time -v, make or find a synthetic checkpoint."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DPPA = [sys.executable, "-m", "dppa"]  # the repository's package, whether or not it is pip-installed


@dataclass
class Run:
    wall_s: float
    cpu_s: float  # user + system, less sensitive than wall time to other load on the machine
    peak_rss_mib: float
    load_avg: float = 0.0  # 1-minute load average when the run ended: above the core count, times are inflated


def bench_env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def measure(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Run:
    """Run cmd under /usr/bin/time -v; wall time from this process's clock, peak RSS and CPU from time's report."""
    report = log.with_suffix(".time")
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(["/usr/bin/time", "-v", "-o", str(report)] + cmd, stdout=out,
                              stderr=subprocess.STDOUT, env=env or bench_env())
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}), see {log}: {' '.join(cmd)}")
    text = report.read_text()

    def field(label: str) -> float:
        return float(re.search(re.escape(label) + r"[^:]*:\s*([\d.]+)", text).group(1))

    return Run(wall, field("User time") + field("System time"), field("Maximum resident set size") / 1024,
               os.getloadavg()[0])


def combine(steps: list[Run]) -> Run:
    """A pipeline of steps run one after another: times add, peak memory is the largest step's."""
    return Run(sum(r.wall_s for r in steps), sum(r.cpu_s for r in steps), max(r.peak_rss_mib for r in steps),
               max(r.load_avg for r in steps))


def median_run(runs: list[Run]) -> Run:
    """Median times; peak memory is the worst run's."""
    return Run(statistics.median(r.wall_s for r in runs), statistics.median(r.cpu_s for r in runs),
               max(r.peak_rss_mib for r in runs), statistics.median(r.load_avg for r in runs))


def ensure_checkpoint(work: Path, params: str, dtype: str, seed: int, finetunes: int = 2) -> Path:
    """bench/out/syn-PARAMS-DTYPE-sSEED made by make_synthetic.py, reused when it is already there."""
    folder = work / f"syn-{params}-{dtype}-s{seed}"
    if not (folder / f"ft{finetunes}" / "model.safetensors.index.json").exists():
        subprocess.run([sys.executable, str(BENCH / "make_synthetic.py"), str(folder), "--params", params,
                        "--dtype", dtype, "--finetunes", str(finetunes), "--seed", str(seed), "--overwrite"],
                       check=True)
    return folder.resolve()
