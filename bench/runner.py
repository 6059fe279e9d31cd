"""Shared by the benchmark scripts: run a command under /usr/bin/time -v, make or find a synthetic checkpoint, drop
files from the page cache.

    python bench/runner.py evict FOLDER...    # before a command timed from disk, e.g. with farm-bench"""

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
# -P: do not put the working directory first on sys.path, so PYTHONPATH (see bench_env) decides which dppa runs
DPPA = [sys.executable, "-P", "-m", "dppa"]


@dataclass
class Run:
    wall_s: float
    cpu_s: float  # user + system, less sensitive than wall time to other load on the machine
    peak_rss_mib: float
    load_avg: float = 0.0  # 1-minute load average when the run ended: above the core count, times are inflated


def snapshot(commit: str, work: Path, paths: tuple[str, ...] = ("dppa",)) -> Path:
    """The repository's `paths` at `commit`, unpacked under `work`, so figures belong to one known version of the
    engine even while the working tree changes."""
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", commit], check=True, capture_output=True, text=True
    ).stdout.strip()
    dest = work / f"src-{sha}"
    if not all((dest / path).exists() for path in paths):
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", sha, *paths], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest.resolve()


def source_label(src: Path) -> str:
    """Which engine a figure belongs to: a snapshot's commit, or the working tree's HEAD plus local edits."""
    if src != REPO:
        return src.name.removeprefix("src-")
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "dppa"], capture_output=True, text=True
    ).stdout.strip()
    return head + ("+uncommitted dppa/ edits" if dirty else "")


def bench_env(threads: int | None = None, src: Path = REPO) -> dict[str, str]:
    """Environment of every measured command; `threads` caps torch's intra-op (OpenMP) threads for all tools alike.

    Why the cap exists: when other work shares the cores, OpenMP threads spin-wait on each other and a 2-thread
    run can be ten times slower than a 1-thread one, so comparisons on a busy machine are fairer at 1 thread.
    """
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(src) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def measure(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Run:
    """Run cmd under /usr/bin/time -v; wall time from this process's clock, peak RSS and CPU from time's report."""
    report = log.with_suffix(".time")
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(
            ["/usr/bin/time", "-v", "-o", str(report)] + cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env or bench_env(),
        )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}), see {log}: {' '.join(cmd)}")
    text = report.read_text()

    def field(label: str) -> float:
        return float(re.search(re.escape(label) + r"[^:]*:\s*([\d.]+)", text).group(1))

    return Run(
        wall, field("User time") + field("System time"), field("Maximum resident set size") / 1024, os.getloadavg()[0]
    )


def combine(steps: list[Run]) -> Run:
    """A pipeline of steps run one after another: times add, peak memory is the largest step's."""
    return Run(
        sum(r.wall_s for r in steps),
        sum(r.cpu_s for r in steps),
        max(r.peak_rss_mib for r in steps),
        max(r.load_avg for r in steps),
    )


def median_run(runs: list[Run]) -> Run:
    """Median times; peak memory is the worst run's."""
    return Run(
        statistics.median(r.wall_s for r in runs),
        statistics.median(r.cpu_s for r in runs),
        max(r.peak_rss_mib for r in runs),
        statistics.median(r.load_avg for r in runs),
    )


def ensure_checkpoint(work: Path, params: str, dtype: str, seed: int, finetunes: int = 2) -> Path:
    """bench/out/syn-PARAMS-DTYPE-sSEED made by make_synthetic.py, reused when it is already there."""
    folder = work / f"syn-{params}-{dtype}-s{seed}"
    if not (folder / f"ft{finetunes}" / "model.safetensors.index.json").exists():
        subprocess.run(
            [
                sys.executable,
                str(BENCH / "make_synthetic.py"),
                str(folder),
                "--params",
                params,
                "--dtype",
                dtype,
                "--finetunes",
                str(finetunes),
                "--seed",
                str(seed),
                "--overwrite",
            ],
            check=True,
        )
    return folder.resolve()


def evict(folder: Path) -> None:
    """Drop the folder's weight files from the page cache (POSIX_FADV_DONTNEED: no root needed), so that the next
    read comes from disk. Hard-linked files are the same inode, so a shared shard is evicted through any name."""
    for path in Path(folder).glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "evict":
        sys.exit("usage: python bench/runner.py evict FOLDER...")
    for folder in sys.argv[2:]:
        evict(Path(folder))
