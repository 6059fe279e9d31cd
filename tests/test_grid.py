"""The experiment grid's expansion and tables (the DVC runs themselves are tested in test_pipeline.py)."""

import json
import subprocess
import time

import pytest
import yaml

from dppa.errors import DppaError
from dppa.pipeline.grid import finished_experiments, load_grid, points, table


def git(project, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=project, check=True, capture_output=True, text=True).stdout


def committed_dvc_project(project, params: str, stages: dict) -> None:
    """A git + DVC repository in `project` with this params.yaml and these dvc.yaml stages, committed as the
    experiments' baseline."""
    from dppa.pipeline.grid import dvc

    git(project, "init", "-q")
    git(project, "config", "user.email", "t@example.com")
    git(project, "config", "user.name", "t")
    dvc(project, "init", "-q")
    (project / "params.yaml").write_text(params)
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    git(project, "add", "-A")
    git(project, "commit", "-qm", "baseline")


def test_points_are_the_product_of_the_axes_times_the_seeds():
    spec = {
        "set": {"evaluate.limit": None},
        "seeds": [{"zoo.seed": 0}, {"zoo.seed": 1}],
        "grids": {
            "g": {
                "table": "merges",
                "axes": {
                    "zoo.regime": ["heavy", "light"],
                    "combination": [
                        {"label": "TA", "merge.method": "task_arithmetic"},
                        {"label": "TIES", "merge.method": "ties", "merge.density": 0.2},
                    ],
                },
            }
        },
    }
    found = points(spec, "g")
    assert len(found) == 2 * 2 * 2
    assert len({p["name"] for p in found}) == 8
    ties_light_seed1 = next(
        p for p in found if p["labels"] == {"zoo.regime": "light", "combination": "TIES"} and p["seed"] == 1
    )
    assert ties_light_seed1["overrides"] == {
        "evaluate.limit": None,
        "zoo.regime": "light",
        "merge.method": "ties",
        "merge.density": 0.2,
        "zoo.seed": 1,
    }
    assert points(spec, "g") == found  # names are stable: a rerun finds the recorded points


def test_table_is_mean_and_sample_std_over_seeds():
    rows = [
        {"regime": "heavy", "finetune": "a", "method": "dp", "density": 0.2, "seed": 0, "normalised": 0.5},
        {"regime": "heavy", "finetune": "a", "method": "dp", "density": 0.2, "seed": 1, "normalised": 0.7},
        {"regime": "heavy", "finetune": "a", "method": "dp", "density": 0.2, "seed": 1, "normalised": 0.7},
        {"regime": "heavy", "finetune": "a", "method": "dare", "density": 0.2, "seed": 0, "normalised": None},
    ]
    text = table(rows, ["regime", "finetune"], ["method", "density"])
    # (0.5 + 0.7) / 2 = 0.6; sample std = sqrt(((0.1)^2 + (0.1)^2) / 1) = 0.1414; the repeated seed counts once
    assert text.splitlines() == [
        "| regime | finetune | dp 0.2 | dare 0.2 |",
        "|---|---|---|---|",
        "| heavy | a | 0.600 ± 0.141 | - |",
    ]


def test_grid_file_errors_name_the_key(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"grids": {"g": {"table": "pruning", "axes": {}}}}))
    with pytest.raises(DppaError, match="grids.g: give `table`"):
        load_grid(path)
    path.write_text(yaml.safe_dump({"grids": {"g": {"table": "merges", "axes": {"combination": ["x"]}}}}))
    with pytest.raises(DppaError, match="grids.g.axes.combination: not a params key"):
        load_grid(path)
    path.write_text(yaml.safe_dump({"grid": {}}))
    with pytest.raises(DppaError, match="expected `grids"):
        load_grid(path)


def test_the_paper_grid_file_is_valid_and_its_overrides_are_valid_params():
    from pathlib import Path

    from dppa.pipeline.config import parse_params

    root = Path(__file__).resolve().parents[1]
    spec = load_grid(root / "experiments" / "paper.yaml")
    base = yaml.safe_load((root / "params.yaml").read_text())
    for grid in spec["grids"]:
        for point in points(spec, grid)[:: len(spec["seeds"])]:
            params = yaml.safe_load(yaml.safe_dump(base))
            for key, value in point["overrides"].items():
                *parents, last = key.split(".")
                node = params
                for part in parents:
                    node = node[part]
                node[last] = value
            parse_params(params)


def test_an_experiment_still_running_in_the_workspace_is_not_recorded():
    metrics = {"data/metrics/m.json": {"data": {"score": 0.5}}}
    shown = [
        {
            "rev": "workspace",
            "data": {"rev": "workspace", "metrics": metrics},
            "experiments": [
                {"revs": [{"rev": "workspace", "name": "running", "data": {"rev": "workspace", "metrics": metrics}}]},
                {"revs": [{"rev": "a" * 40, "name": "done", "data": {"rev": "a" * 40, "metrics": metrics}}]},
            ],
        }
    ]
    assert finished_experiments(shown) == {"done": {"data/metrics/m.json": {"score": 0.5}, "params.yaml": {}}}


def test_points_log_ignores_only_a_torn_last_line(tmp_path):
    from dppa.pipeline.grid import POINTS_LOG, logged

    entry = {"name": "pruning-abc", "commit": "0" * 40, "metrics": {"params.yaml": {"prune": {"density": 0.2}}}}
    path = tmp_path / POINTS_LOG
    path.write_text(json.dumps(entry) + "\n" + '{"name": "pruning-de')  # the second write was cut by a crash
    said = []
    assert logged(tmp_path, said.append) == {"pruning-abc": entry["metrics"]}
    assert said and "incomplete last line" in said[0]
    path.write_text('{"name": "pruning-de\n' + json.dumps(entry) + "\n")  # damage before the end is not a crash's
    with pytest.raises(DppaError, match=r"points.jsonl:1: not a recorded point"):
        logged(tmp_path)
    assert logged(tmp_path / "nothing-yet") == {}


def test_tables_sum_the_points_wall_time_over_sittings(tmp_path):
    from dppa.pipeline.grid import POINTS_LOG, write_tables

    spec = {
        "seeds": [{"zoo.seed": 0}, {"zoo.seed": 1}, {"zoo.seed": 2}],
        "grids": {"g": {"table": "finetunes", "axes": {"prune.method": ["dp"], "prune.density": [0.2]}}},
    }
    record = {
        "method": "dp",
        "density": 0.2,
        "scores": {"dense": {"t": 0.8}, "base": {"t": 0.0}, "pruned": {"t": 0.4}, "amplified": {"t": 0.6}},
    }
    metrics = {"data/metrics/finetunes/a.json": record, "params.yaml": {}}
    # seed 0 in one sitting (its zoo build included), seed 1 in another, seed 2 logged before points were timed
    lines = [
        {"name": p["name"], "commit": "0" * 40, "metrics": metrics, **({"seconds": s} if s is not None else {})}
        for p, s in zip(points(spec, "g"), [1800.0, 5400.0, None])
    ]
    (tmp_path / POINTS_LOG).write_text("".join(json.dumps(line) + "\n" for line in lines))
    text = write_tables(spec, ["g"], [], tmp_path).read_text()
    assert "Wall time of the 2 timed points, summed over sittings: 2.00 h" in text  # (1800 + 5400) s / 3600
    assert "## g (3 of 3 points; 2 timed, 2.00 h of wall)" in text
    # the ratio to the dense fine-tune, the same on every seed: pruned 0.4 / 0.8, amplified 0.6 / 0.8
    assert "| a | 0.500 ± 0.000 | 0.750 ± 0.000 |" in text


@pytest.mark.slow
def test_one_experiment_is_read_as_dvc_exp_show_lists_it(tmp_path):
    """After each point the grid reads that experiment alone (its cost must not grow with the experiments held);
    the record must be the one `dvc exp show` lists for it, lists dropped from metrics and kept in params."""
    import sys

    from dppa.pipeline.grid import dvc, experiment_record, recorded

    (tmp_path / "make.py").write_text(
        "import json, yaml\n"
        "a = yaml.safe_load(open('params.yaml'))['a']\n"
        "json.dump({'score': a / 4, 'per': [a, a], 'nested': {'x': a}}, open('m.json', 'w'))\n"
    )
    stage = {"cmd": f"{sys.executable} make.py", "deps": ["make.py"], "params": ["a"]}
    stage["metrics"] = [{"m.json": {"cache": False}}]
    committed_dvc_project(tmp_path, "a: 1\nb: {c: [1, 2], d: x}\n", {"s": stage})
    for name, a in (("first", 3), ("second", 5)):
        dvc(tmp_path, "exp", "run", "-q", "-n", name, "-S", f"a={a}")
        git(tmp_path, "checkout", "-q", "params.yaml")
    listed = recorded(tmp_path)
    assert {"first", "second"} <= set(listed)  # with the baseline branch
    for name, a in (("first", 3), ("second", 5)):
        record = experiment_record(tmp_path, name)
        assert record == listed[name]
        assert record["m.json"] == {"score": a / 4, "nested": {"x": a}}
        assert record["params.yaml"] == {"a": a, "b": {"c": [1, 2], "d": "x"}}
    with pytest.raises(DppaError, match="no experiment 'third'"):
        experiment_record(tmp_path, "third")


def test_sigterm_inside_a_point_runs_its_cleanup(tmp_path):
    """A grid stopped with SIGTERM must put params.yaml back as Ctrl-C does: the signal becomes KeyboardInterrupt
    inside `terminated_as_interrupt`, so `finally` runs, and the handler before it is restored afterwards."""
    import signal
    import sys

    params = tmp_path / "params.yaml"
    params.write_text("mine: 1\n")
    script = f"""
import os, signal, time
from pathlib import Path
from dppa.pipeline.lifeline import terminated_as_interrupt
params = Path({str(params)!r})
before = signal.getsignal(signal.SIGTERM)
try:
    with terminated_as_interrupt():
        try:
            params.write_text("a point's overrides\\n")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        finally:
            params.write_text("mine: 1\\n")
except KeyboardInterrupt as stopped:
    print("interrupted:", stopped)
print("handler restored:", signal.getsignal(signal.SIGTERM) == before)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"interrupted: stopped by signal {signal.SIGTERM.value}" in done.stdout
    assert "handler restored: True" in done.stdout
    assert params.read_text() == "mine: 1\n"


@pytest.mark.parametrize("ignores_sigterm", [False, True])
def test_stopping_a_command_stops_its_whole_process_group(tmp_path, ignores_sigterm):
    """What a stopped grid does to its `dvc exp run`: every process of the group goes (SIGTERM, then SIGKILL for
    those that ignore it), not only the leader, whose stage and workers would otherwise run on."""
    from pathlib import Path

    from dppa.pipeline.grid import stop_group

    def alive(pid: int) -> bool:
        stat = Path(f"/proc/{pid}/stat")
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
        except FileNotFoundError:
            return False

    pids = tmp_path / "pids"
    trap = "trap '' TERM; " if ignores_sigterm else ""
    script = f"{trap}sleep 300 & echo $! > {pids}.tmp; mv {pids}.tmp {pids}; sleep 300"
    leader = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    for _ in range(100):
        if pids.exists():
            break
        time.sleep(0.05)
    child = int(pids.read_text())
    assert alive(leader.pid) and alive(child)
    stop_group(leader, grace=1.0)
    assert leader.returncode is not None
    for _ in range(50):  # the orphaned child is reaped by whoever adopted it
        if not alive(child):
            break
        time.sleep(0.05)
    assert not alive(child)


@pytest.mark.slow
def test_a_point_stopped_inside_a_stage_leaves_params_and_git_index_as_they_were(tmp_path):
    """A `dvc exp run` stopped in its second stage leaves params.yaml and dvc.lock staged in git's index; the grid
    must put the index back as it was before the point, the user's own staged change included, and params.yaml."""
    import signal
    import sys

    started = tmp_path / "started"
    (tmp_path / "make.py").write_text(
        "import json, pathlib, time\n"
        f"pathlib.Path({str(started)!r}).touch()\n"
        "time.sleep(120)\n"
        "json.dump({'score': 1}, open('m.json', 'w'))\n"
    )
    first = {"cmd": "echo first > first.txt", "params": ["a"], "outs": ["first.txt"]}
    stage = {"cmd": f"{sys.executable} make.py", "deps": ["make.py", "first.txt"], "params": ["a"]}
    stage["metrics"] = [{"m.json": {"cache": False}}]
    committed_dvc_project(tmp_path, "a: 1\n", {"first": first, "s": stage})
    (tmp_path / "notes.txt").write_text("mine\n")
    git(tmp_path, "add", "notes.txt")  # the user's own staged change must survive
    staged_before = git(tmp_path, "diff", "--cached", "--name-only")
    point = {"name": "p", "overrides": {"a": 7}}
    script = (
        "from pathlib import Path\n"
        "from dppa.pipeline.grid import run_point\n"
        f"run_point(Path({str(tmp_path)!r}), {point!r})\n"
    )
    running = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(1200):
        if started.exists() or running.poll() is not None:
            break
        time.sleep(0.1)
    assert started.exists(), running.communicate()
    running.send_signal(signal.SIGTERM)
    _, stderr = running.communicate(timeout=60)
    assert running.returncode != 0 and b"KeyboardInterrupt" in stderr
    assert (tmp_path / "params.yaml").read_text() == "a: 1\n"
    assert git(tmp_path, "diff", "--cached", "--name-only") == staged_before == "notes.txt\n"
