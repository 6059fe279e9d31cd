"""Experiments as parameter grids over the pipeline: each point of a grid is a set of params.yaml overrides run
as one DVC experiment (`dvc exp run -S key=value ...`) through the same stages as `dvc repro`; the tables come
from the metrics DVC records for each experiment (`dvc exp show --json`), as mean +- std over the seeds.

    dppa grid experiments/paper.yaml [--only GRID] [--where KEY=VALUE] [--tables-only]

The grid file (see experiments/paper.yaml):
    set:    {key: value}              overrides applied at every point
    seeds:  [{key: value}, ...]       repeats of every point, averaged in the tables
    metric: ratio | gain              the tables' value: score / the dense fine-tune's (ratio, default), or the
                                      share of the fine-tune's gain over the base that is kept, (score - base) /
                                      (dense - base) capped at 1 (gain: for a real base, which does not score 0)
    grids:  {name: {table: finetunes | merges, axes: {axis: [values]}, set: {key: value}, targets: [stage]}}
            an axis named after a params key takes plain values; any other axis takes mappings of overrides,
            each with a `label`; a grid's own `set` adds to the global one; `targets` limits each point's run
            to those stages and what they depend on (e.g. [score] for per-fine-tune tables: no merge is run)
A point whose experiment already exists (same name, same baseline commit) is not run again, so an interrupted grid
resumes where it stopped; DVC's run cache restores every stage that already ran with the same inputs. Stopping a
grid (Ctrl-C, or SIGTERM) stops the running point's DVC command and its stage with it and puts params.yaml and
git's index back (a stopped `dvc exp run` leaves its files staged).
Each finished point is also appended to RESULTS/points.jsonl (its name, the commit it ran at, its wall seconds, its
metrics and params): commit that file and a later sitting, another clone or another commit skips those points too
and tables them with the new ones, and results.md sums their wall time across sittings. Delete a point's line (or
the file) to run it again, e.g. after a change that should alter its result. Afterwards params.yaml is as it was and
data/ holds the last point's outputs: `dvc repro` restores the workspace's own.
The stages are plain commands, so a grid needs no Prefect API. `--where zoo.regime=heavy` runs a slice, e.g. one
slice per clone of the project on machines that share nothing; `--tables-only -C clone1 -C clone2` then writes the
tables from all.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import time
from pathlib import Path

import yaml

from dppa.errors import DppaError
from dppa.evaluation.objective import gain_kept, mean_gain_kept, normalised_score, ratio
from dppa.pipeline.dvc_process import dvc_command, stage_environment
from dppa.pipeline.lifeline import terminated_as_interrupt

TABLES = ("finetunes", "merges")
POINTS_LOG = "points.jsonl"
METRICS = ("ratio", "gain")
PARAMS = "params.yaml"


def load_grid(path: Path) -> dict:
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DppaError(f"{path}: cannot read ({exc})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("grids"), dict):
        raise DppaError(f"{path}: expected `grids: {{name: {{table: ..., axes: ...}}}}`")
    unknown = set(spec) - {"set", "seeds", "grids", "metric"}
    if unknown:
        raise DppaError(f"{path}: unknown key {sorted(unknown)[0]!r}; allowed: set, seeds, grids, metric")
    if spec.get("metric", "ratio") not in METRICS:
        raise DppaError(f"{path}: metric {spec['metric']!r}; choose one of {', '.join(METRICS)}")
    for name, grid in spec["grids"].items():
        if grid.get("table") not in TABLES or not isinstance(grid.get("axes"), dict):
            raise DppaError(f"{path}: grids.{name}: give `table` ({' | '.join(TABLES)}) and `axes`")
        unknown = set(grid) - {"table", "axes", "set", "targets"}
        if unknown:
            raise DppaError(
                f"{path}: grids.{name}: unknown key {sorted(unknown)[0]!r}; allowed: table, axes, set, targets"
            )
        for axis, values in grid["axes"].items():
            if "." not in axis and not all(isinstance(v, dict) and "label" in v for v in values):
                raise DppaError(
                    f"{path}: grids.{name}.axes.{axis}: not a params key, so each value must be a "
                    "mapping of overrides with a `label`"
                )
    return spec


def points(spec: dict, grid: str) -> list[dict]:
    """[{"name", "grid", "labels": {axis: label}, "seed": index, "overrides": {key: value}}] of one grid."""
    axes = spec["grids"][grid]["axes"]
    out = []
    for combination in itertools.product(*axes.values()):
        labels, overrides = {}, {**(spec.get("set") or {}), **(spec["grids"][grid].get("set") or {})}
        for axis, value in zip(axes, combination):
            if "." in axis:
                labels[axis], overrides[axis] = value, value
            else:
                labels[axis] = value["label"]
                overrides.update({k: v for k, v in value.items() if k != "label"})
        for seed, repeat in enumerate(spec.get("seeds") or [{}]):
            point = {**overrides, **repeat}
            digest = hashlib.sha256(json.dumps(point, sort_keys=True).encode()).hexdigest()[:10]
            out.append({"name": f"{grid}-{digest}", "grid": grid, "labels": labels, "seed": seed, "overrides": point})
    return out


def dvc(project: Path, *args: str) -> str:
    """`dvc ARGS` in `project`, its output; a failure is one DppaError with the end of what DVC printed.

    DVC runs in a process group of its own, and a grid stopped meanwhile (Ctrl-C, SIGTERM) stops the whole group:
    killing DVC alone left the stage it ran (a zoo build's training workers, say) going on for minutes."""
    process = subprocess.Popen(
        [*dvc_command(), *args],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=stage_environment(),
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate()
    except BaseException:
        stop_group(process)
        raise
    if process.returncode != 0:
        raise DppaError(f"dvc {' '.join(args)} failed in {project}:\n{stdout[-2000:]}{stderr[-2000:]}")
    return stdout


def stop_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to every process of `process`'s group (it leads one: start_new_session), SIGKILL to those still
    there after `grace` seconds; `process` is reaped."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            process.poll()  # reaped, the leader no longer counts as a member
            os.killpg(process.pid, 0)  # raises once no process of the group is left
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def recorded(project: Path) -> dict[str, dict]:
    """{experiment name: its metrics {file: data}} of the experiments DVC holds for the current commit."""
    return finished_experiments(json.loads(dvc(project, "exp", "show", "--json")))


def experiment_record(project: Path, name: str) -> dict:
    """What `recorded(project)[name]` gives, read for this one experiment: `dvc exp show` over every experiment
    costs about 0.3 s per experiment held, so calling it after each point made a grid's overhead grow with the
    square of its points. DVC keeps an experiment of commit C at refs/exps/C[:2]/C[2:]/NAME; shown with `--rev`,
    that commit is read alone, by the same code (its metrics and params, in the same JSON)."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    ref = f"refs/exps/{head[:2]}/{head[2:]}/{name}"
    found = subprocess.run(["git", "rev-parse", "--verify", "-q", ref], cwd=project, capture_output=True, text=True)
    rev = found.stdout.strip()
    if found.returncode != 0 or not rev:
        raise DppaError(f"{project}: DVC recorded no experiment {name!r} for commit {head[:10]} ({ref} is missing)")
    shown = json.loads(dvc(project, "exp", "show", "--json", "--rev", rev, "--hide-workspace"))
    entry = next((node for node in shown if node.get("rev") == rev), None)
    if entry is None or not isinstance(entry.get("data"), dict) or "metrics" not in entry["data"]:
        raise DppaError(f"{project}: `dvc exp show --rev {rev[:10]}` gave no metrics for experiment {name!r}")
    return _metrics_and_params(entry["data"])


def _metrics_and_params(data: dict) -> dict:
    """{metrics file: data, "params.yaml": params} of one revision in `dvc exp show --json`."""
    record = {f: m.get("data", {}) for f, m in (data["metrics"] or {}).items()}
    # DVC drops lists from metrics (scores.json's fine-tune -> tasks), but not from params
    record[PARAMS] = (data.get("params") or {}).get(PARAMS, {}).get("data", {})
    return record


def finished_experiments(shown) -> dict[str, dict]:
    """{name: {metrics file: data, "params.yaml": params}} of the named experiments of `dvc exp show --json`
    that DVC committed (a 40-hex rev): one still running in the workspace is listed too, with rev "workspace" and
    the previous point's metrics, and must not count."""
    found = {}

    def walk(node):
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            data = node.get("data")
            if (
                node.get("name")
                and re.fullmatch(r"[0-9a-f]{40}", str(node.get("rev", "")))
                and isinstance(data, dict)
                and "metrics" in data
            ):
                found[node["name"]] = _metrics_and_params(data)
            for value in node.values():
                walk(value)

    walk(shown)
    return found


def logged(results: Path, log=print) -> dict[str, dict]:
    """{name: metrics} of the points appended to results/points.jsonl, by any sitting, clone or commit."""
    return {name: entry["metrics"] for name, entry in logged_entries(results, log).items()}


def logged_entries(results: Path, log=print) -> dict[str, dict]:
    """{name: its whole points.jsonl entry (metrics, commit, recorded, seconds where timed)}."""
    path = results / POINTS_LOG
    lines = path.read_text().splitlines() if path.exists() else []
    found = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if isinstance(entry, dict) and {"name", "metrics"} <= set(entry):
            found[entry["name"]] = entry
        elif number == len(lines):  # a write cut short by a crash: that point was not recorded, and runs again
            log(f"{path}:{number}: an incomplete last line, ignored (its point runs again)")
        else:
            raise DppaError(f"{path}:{number}: not a recorded point; delete the line (its point runs again)")
    return found


def log_point(results: Path, project: Path, name: str, metrics: dict, seconds: float | None = None) -> None:
    """Append one finished point to results/points.jsonl, with the commit it ran at and, `seconds`, its wall
    time (so a grid run over several sittings can still be summed)."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    entry = {
        "name": name,
        "commit": head,
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "metrics": metrics,
    }
    if seconds is not None:
        entry["seconds"] = round(seconds, 1)
    results.mkdir(parents=True, exist_ok=True)
    with (results / POINTS_LOG).open("a") as out:
        out.write(json.dumps(entry, sort_keys=True) + "\n")


def git_index_tree(project: Path) -> str | None:
    """The git index of `project`'s repository as a tree id (`git write-tree`); None where it cannot be written
    (no repository, or a merge in progress): then it is not restored either."""
    done = subprocess.run(["git", "write-tree"], cwd=project, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def restore_git_index(project: Path, tree: str | None) -> None:
    """Put the index back to `tree`; the files in the work tree are not touched."""
    if tree is not None:
        subprocess.run(["git", "read-tree", tree], cwd=project, capture_output=True, check=True)


def run_point(project: Path, point: dict, targets: list[str] = (), log=print) -> None:
    """One `dvc exp run` in the workspace; params.yaml and the git index are put back as they were afterwards,
    also when the grid is stopped (Ctrl-C, or SIGTERM: `terminated_as_interrupt`), which stops the `dvc exp run`
    too: a stopped `dvc exp run` leaves params.yaml, dvc.lock and the metrics staged in the index."""
    params = project / "params.yaml"
    saved = params.read_text()
    index = git_index_tree(project)
    sets = [f"{key}={json.dumps(value)}" for key, value in point["overrides"].items()]
    log(f"{point['name']}: {' '.join(sets)}" + (f" (stages {' '.join(targets)})" if targets else ""))
    started = time.monotonic()
    with terminated_as_interrupt():
        try:
            dvc(project, "exp", "run", "-n", point["name"], *(arg for s in sets for arg in ("-S", s)), *targets)
        finally:
            params.write_text(saved)
            restore_git_index(project, index)
    log(f"{point['name']}: done in {time.monotonic() - started:.0f} s")


def matches(point: dict, where: dict[str, object]) -> bool:
    """--where KEY=VALUE filters: the point's override of KEY equals VALUE (read as YAML: 0.2, heavy, null)."""
    return all(key in point["overrides"] and point["overrides"][key] == value for key, value in where.items())


def parse_where(items: list[str]) -> dict[str, object]:
    where = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DppaError(f"--where {item}: expected KEY=VALUE, e.g. zoo.regime=heavy")
        where[key] = yaml.safe_load(value)
    return where


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def kept(score: float, dense: float, base: float | None) -> float | None:
    """The ratio to the dense fine-tune (base None) or the share of its gain over the base kept
    (dppa.evaluation.objective); None where the zero rule leaves nothing to divide by."""
    return ratio(score, dense) if base is None else gain_kept(score, dense, base)


def finetune_rows(point: dict, metrics: dict, gain: bool = False) -> list[dict]:
    """Per fine-tune: the pruned and amplified fine-tune's normalised score (or, `gain`, the mean share of the
    dense fine-tune's gain over the base kept), as dppa.evaluation.objective defines them."""
    rows = []
    for file, record in sorted(metrics.items()):
        if "/finetunes/" not in file:
            continue
        scores = record["scores"]
        strategy = point["overrides"].get("amplify.search.strategy")
        for variant in ("pruned", "amplified"):
            candidate = scores.get(variant, {})
            if gain:
                value = mean_gain_kept(candidate, scores["dense"], scores["base"]) if candidate else None
            else:
                value = normalised_score(candidate, scores["dense"]) if candidate else None
            method = record["method"] if variant == "pruned" else f"dppa ({strategy})" if strategy else "dppa"
            rows.append(
                {
                    **point["labels"],
                    "seed": point["seed"],
                    "finetune": Path(file).stem,
                    "method": method,
                    "density": record["density"],
                    "normalised": value,
                }
            )
    return rows


def merge_rows(point: dict, metrics: dict, gain: bool = False) -> list[dict]:
    """Per task: the merged model's score over the dense fine-tune that owns the task (or, `gain`, the share of
    its gain over the base kept), and the merge scale."""
    scores = next(m for f, m in metrics.items() if f.endswith("scores.json"))
    merge = next((m for f, m in metrics.items() if f.endswith("merge.json")), {})
    finetunes = metrics[PARAMS]["models"]["finetunes"]
    owners = {task: ft for ft, entry in finetunes.items() for task in entry.get("tasks") or []}
    rows = []
    for task, owner in owners.items():
        dense = next(iter(scores["models"][owner][task].values()))
        merged = next(iter(scores["models"]["merged"][task].values()))
        base = next(iter(scores["models"]["base"][task].values())) if gain else None
        rows.append({**point["labels"], "seed": point["seed"], "task": task, "normalised": kept(merged, dense, base)})
    # the merge scale used, in a column of its own
    return rows + [{**point["labels"], "seed": point["seed"], "task": "scale", "normalised": merge.get("scale")}]


def table(rows: list[dict], index: list[str], columns: list[str]) -> str:
    """Markdown: mean +- std of `normalised` over seeds, per (index) row and (columns) column."""
    cells: dict[tuple, dict[tuple, list[float]]] = {}
    seen = set()
    for row in rows:
        key, column = tuple(row[i] for i in index), tuple(row[c] for c in columns)
        values = cells.setdefault(key, {}).setdefault(column, [])
        if (key, column, row["seed"]) in seen:  # DPPA's row comes with every pruning method's point: count it once
            continue
        seen.add((key, column, row["seed"]))
        if row["normalised"] is not None:
            values.append(row["normalised"])
    header = list(dict.fromkeys(c for per in cells.values() for c in per))
    lines = [
        "| " + " | ".join(index + [" ".join(map(str, c)) for c in header]) + " |",
        "|" + "---|" * (len(index) + len(header)),
    ]
    for key, per in cells.items():
        lines.append("| " + " | ".join([str(k) for k in key] + [_cell(per.get(c, [])) for c in header]) + " |")
    return "\n".join(lines) + "\n"


def timed_seconds(entries: dict[str, dict], among: list[dict]) -> list[float]:
    """The wall seconds points.jsonl holds for these points (points logged before timing have none)."""
    return [entries[p["name"]]["seconds"] for p in among if "seconds" in entries.get(p["name"], {})]


def wall_time(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def write_tables(spec: dict, grids: list[str], projects: list[Path], results: Path) -> Path:
    """results/<grid>.md and .csv from the experiments recorded in the projects; returns results/results.md."""
    import pandas as pd

    entries = logged_entries(results)
    metrics = {name: entry["metrics"] for name, entry in entries.items()}
    metrics.update({name: m for project in projects for name, m in recorded(project).items()})
    gain = spec.get("metric") == "gain"
    value = (
        "Gain retention = (score - base) / (dense fine-tune - base) on the same task, capped at 1"
        if gain
        else "Normalised score = score / the dense fine-tune's score on the same task"
    )
    sections = [
        f"# Experiment results\n\n{value} (test split); mean ± std over seeds; '-' = no point recorded, or the "
        "dense fine-tune scores 0 (no better than the base, for gain retention).\n"
    ]
    for grid in grids:
        done = [(p, metrics[p["name"]]) for p in points(spec, grid) if p["name"] in metrics]
        kind = spec["grids"][grid]["table"]
        axes = [a for a in spec["grids"][grid]["axes"] if a not in ("prune.method", "prune.density")]
        if kind == "finetunes":
            rows = [r for p, m in done for r in finetune_rows(p, m, gain)]
            text = table(rows, axes + ["finetune"], ["method", "density"])
        else:
            rows = [r for p, m in done for r in merge_rows(p, m, gain)]
            text = table(rows, axes, ["task"])
        results.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(results / f"{grid}.csv", index=False)
        (results / f"{grid}.md").write_text(text)
        timed = timed_seconds(entries, [p for p, _ in done])
        took = f"; {len(timed)} timed, {wall_time(sum(timed))} of wall" if timed else ""
        sections.append(f"## {grid} ({len(done)} of {len(points(spec, grid))} points{took})\n\n{text}")
    everything = timed_seconds(entries, [p for g in grids for p in points(spec, g)])
    if everything:
        sections[0] += (
            f"\nWall time of the {len(everything)} timed points, summed over sittings: {wall_time(sum(everything))} "
            "(a point that builds a zoo counts its build; DVC's run cache and the evaluation cache make later points "
            "of a slice cheaper).\n"
        )
    (results / "results.md").write_text("\n".join(sections))
    return results / "results.md"


def run_grid(
    spec: dict,
    grids: list[str],
    project: Path,
    results: Path,
    where: dict | None = None,
    log=print,
) -> Path:
    """Run the points not recorded yet (by DVC for this commit, or in results/points.jsonl), then write the
    tables."""
    done = set(logged(results, log)) | set(recorded(project))
    for grid in grids:
        for point in points(spec, grid):
            if not matches(point, where or {}):
                continue
            if point["name"] in done:
                log(f"{point['name']}: recorded, skipped")
                continue
            started = time.monotonic()
            run_point(project, point, spec["grids"][grid].get("targets") or [], log)
            metrics = experiment_record(project, point["name"])  # about 1.5 s, counted in the point's time
            log_point(results, project, point["name"], metrics, time.monotonic() - started)
    return write_tables(spec, grids, [project], results)
