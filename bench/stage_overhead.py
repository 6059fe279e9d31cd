"""What each pipeline stage costs in orchestration, on the tiny zoo (where a stage's own work is almost nothing).

    python bench/stage_overhead.py                     # this working tree: plain `dvc repro`, then `dppa run`
    python bench/stage_overhead.py --at 91e0918        # the same for a commit (its dppa/, flows/, tasks/, dvc.yaml)
    python bench/stage_overhead.py --mode repro        # only `dvc repro` (every stage run alone by DVC)

A fresh project (three fine-tunes of the tiny zoo as local folders, fixed amplification factors, a fixed merge
scale, 4 examples per task) is run from nothing, so every stage runs:

- `repro`: plain `dvc repro`, stages one after another, each `dppa stage` process on its own. A stage's wall time
  is from DVC's "Running stage" line to the next one (so it includes DVC's own bookkeeping around it).
- `run`: `dppa run` against a Prefect API started here (its start-up is timed apart), stages side by side; each
  stage's wall time is its Prefect task run's (start to end), read from the API afterwards.
- probes on the finished project, median of 3: interpreter start, `dppa stage report --help` (imports and the
  parser), `dvc repro --single-item report` with nothing stale (DVC's status check), and the report stage's command
  run alone.
- each stage's own work, from the line `dppa stage` prints when it is done; orchestration = wall - work.

Outputs: bench/out/overhead-LABEL/ (projects, logs) and a summary on stdout.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from runner import BENCH, REPO, snapshot

CODE = ("dppa", "flows", "tasks")
PROJECT_FILES = ("dvc.yaml", ".dvcignore", "params.yaml")
FINETUNES = ("arith", "facts", "strings")


def environment(src: Path, prefect_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PYTHONPATH=str(src),
        PREFECT_HOME=str(prefect_home),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    return env


def make_project(folder: Path, src: Path, zoo: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name in PROJECT_FILES:
        shutil.copy(src / name, folder / name)
    for code in CODE:
        shutil.copytree(src / code, folder / code, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["models"] = {
        "base": {"source": str(zoo / "base")},
        "finetunes": {ft: {"source": str(zoo / ft), "tasks": [f"zoo_{ft}"]} for ft in FINETUNES},
    }
    params["zoo"]["size"] = "none"
    params["amplify"] = {"bands": [0.5, 1.0], "factors": [1.8, 1.0]}
    params["merge"].update(scale=0.5, search=None, weights=None)
    params["evaluate"].update(limit=4, batch_size=8)
    params["runtime"].update(device="cpu", concurrency=2)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=folder, check=True)
    return folder


def timed(command: list[str], cwd: Path, env: dict, log: Path) -> tuple[float, list[tuple[float, str]]]:
    """Run command; returns its wall time and its output lines, each with the time it arrived."""
    lines = []
    start = time.perf_counter()
    with subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as process:
        for line in process.stdout:
            lines.append((time.perf_counter() - start, line.rstrip()))
    wall = time.perf_counter() - start
    log.write_text("\n".join(f"{t:8.2f} {line}" for t, line in lines) + "\n")
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}); see {log}")
    return wall, lines


WORK_LINE = re.compile(r"(\S+): the stage's own work took (\d+\.\d+) s")


def own_work(lines: list[tuple[float, str]]) -> dict[str, float]:
    """{stage: seconds of the stage function's own work}, from the line `dppa stage` prints when it is done (code
    from before that line existed prints none: its stages then count as all overhead)."""
    return {m.group(1): float(m.group(2)) for _, line in lines if (m := WORK_LINE.search(line))}


def repro_mode(project: Path, env: dict, work: Path) -> tuple[float, dict[str, float], dict[str, float]]:
    wall, lines = timed([sys.executable, "-m", "dvc", "repro"], project, env, work / "repro.log")
    marks = [(t, m.group(1)) for t, line in lines if (m := re.match(r"Running stage '([^']+)'", line))]
    ends = [t for t, _ in marks[1:]] + [wall]
    return wall, {stage: end - t for (t, stage), end in zip(marks, ends)}, own_work(lines)


def run_mode(project: Path, env: dict, work: Path) -> tuple[float, float, dict[str, float], dict[str, float]]:
    """`dppa run` against an API started here; returns (API start-up s, run wall s, {stage: task run wall s},
    {stage: its own work s})."""
    sys.path.insert(0, str(REPO))
    os.environ.update(PREFECT_HOME=env["PREFECT_HOME"])
    os.environ.pop("PREFECT_API_URL", None)
    import dppa.flows  # noqa: F401  (its environment defaults)
    from dppa.flows.runtime import prefect_api

    started = time.perf_counter()
    with prefect_api() as url:
        api_start = time.perf_counter() - started
        wall, lines = timed(
            [sys.executable, "-m", "dppa", "run", "-C", str(project)],
            project,
            {**env, "PREFECT_API_URL": url},
            work / "run.log",
        )
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            runs = client.read_task_runs()
    stages = {
        r.name: (r.end_time - r.start_time).total_seconds()
        for r in runs
        if r.task_key.startswith("repro_stage") and r.start_time and r.end_time
    }
    return api_start, wall, stages, own_work(lines)


def print_stages(stages: dict[str, float], work: dict[str, float]) -> None:
    """Each stage's wall time, its own work and the difference (orchestration); the median difference last."""
    overhead = {stage: seconds - work.get(stage, 0.0) for stage, seconds in stages.items()}
    print(f"  {'stage':18s} {'wall':>7s} {'work':>7s} {'orchestration':>14s}")
    for stage, seconds in stages.items():
        print(f"  {stage:18s} {seconds:6.1f}s {work.get(stage, 0.0):6.1f}s {overhead[stage]:13.1f}s")
    print(f"  median orchestration per stage: {statistics.median(overhead.values()):.2f} s")


def median_wall(command: list[str], cwd: Path, env: dict, repeat: int = 3) -> float:
    walls = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True)
        walls.append(time.perf_counter() - start)
    return statistics.median(walls)


def probes(project: Path, env: dict, work: Path) -> dict[str, float]:
    stage = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["report"]["cmd"]
    command = stage.split()
    out = work / "probe-report"
    replace = {"--out": str(out), "--summary": str(work / "probe-summary.json")}
    command = [replace.get(command[i - 1], a) if i else a for i, a in enumerate(command)]
    stage_alone = [sys.executable, "-m", *command]
    figures = {
        "interpreter start (python -c pass)": median_wall([sys.executable, "-c", "pass"], project, env),
        "imports + parser (dppa stage report --help)": median_wall(
            [sys.executable, "-m", "dppa", "stage", "report", "--help"], project, env
        ),
        "DVC status, nothing stale (dvc repro --single-item report)": median_wall(
            [sys.executable, "-m", "dvc", "repro", "--single-item", "report"], project, env
        ),
        "report stage alone (dppa stage report ...)": median_wall(stage_alone, project, env),
    }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--at", help="a commit to measure instead of the working tree")
    parser.add_argument("--zoo", type=Path, default=BENCH / "out" / "zoo-tiny", help="a tiny zoo (built if missing)")
    parser.add_argument("--mode", choices=("repro", "run", "both"), default="both")
    args = parser.parse_args()
    work_root = BENCH / "out"
    src = snapshot(args.at, work_root, (*CODE, *PROJECT_FILES)) if args.at else REPO
    for package in ("flows", "tasks") if args.at else ():
        # installed as dppa.flows / dppa.tasks (setup.py): found through PYTHONPATH, before the editable install's
        # mapping to this working tree, when they sit inside the snapshot's dppa/
        link = src / "dppa" / package
        if not link.exists():
            link.symlink_to(Path("..") / package)
    label = src.name.removeprefix("src-") if args.at else "worktree"
    work = work_root / f"overhead-{label}"
    work.mkdir(parents=True, exist_ok=True)
    zoo = args.zoo.resolve()
    env = environment(src, work / "prefect-home-repro")
    if not (zoo / "zoo.json").exists():
        subprocess.run([sys.executable, "-m", "dppa", "zoo", str(zoo), "--size", "tiny"], env=env, check=True)
    print(f"code: {label}; load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.mode in ("repro", "both"):
        project = make_project(work / "project-repro", src, zoo)
        wall, stages, own = repro_mode(project, env, work)
        print(f"\nplain `dvc repro`, {len(stages)} stages one after another: {wall:.1f} s")
        print_stages(stages, own)
        for name, seconds in probes(project, env, work).items():
            print(f"probe: {name}: {seconds:.2f} s")
    if args.mode in ("run", "both"):
        project = make_project(work / "project-run", src, zoo)
        home = work / "prefect-home-run"
        shutil.rmtree(home, ignore_errors=True)  # a database of its own: only this run's task runs
        env = environment(src, home)
        api_start, wall, stages, own = run_mode(project, env, work)
        print(f"\n`dppa run`, {len(stages)} stages (API start-up {api_start:.1f} s, not included): {wall:.1f} s")
        print_stages(stages, own)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
