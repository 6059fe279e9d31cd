"""runtime.task_runner local-gpu-cluster[:N]: a real Dask cluster of one worker process per GPU, each pinned to
its GPU through CUDA_VISIBLE_DEVICES, plus N CPU-only workers. No GPU is needed: the GPU count is given, and what
is checked is what each worker process (and a process it starts, as DVC does for a stage) sees and declares, and
where the scheduler places a task that requires the resource GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dppa.flows.runtime import task_runner, visible_gpus

from dppa.pipeline.config import Runtime

ROOT = Path(__file__).resolve().parents[1]


def test_visible_gpus_name_the_devices_a_worker_is_pinned_to(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpus(3) == ["0", "1", "2"]
    # torch numbers the listed devices 0..n-1; a worker must be given their names from the list
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5, 7,GPU-1f2e")
    assert visible_gpus(3) == ["5", "7", "GPU-1f2e"]
    assert visible_gpus(2) == ["5", "7"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def where_am_i() -> tuple[str, str]:
    """Run on a worker: its name, and CUDA_VISIBLE_DEVICES as a process it starts (a stage's DVC) sees it."""
    from distributed import get_worker

    time.sleep(0.2)  # long enough that the tasks overlap and the scheduler must use more than one worker
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES', 'unset'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return get_worker().name, child.stdout.strip()


@pytest.mark.slow
def test_one_pinned_worker_per_gpu_and_cpu_only_workers(monkeypatch):
    import dask
    from distributed import Client

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    runner = task_runner(Runtime(task_runner="local-gpu-cluster:1"), gpu_count=2)
    assert runner.cluster_kwargs == {"gpus": ["0", "1"], "cpu_workers": 1}
    # what prefect_dask's DaskTaskRunner does when the flow starts
    with runner.cluster_class(**runner.cluster_kwargs) as cluster, Client(cluster) as client:
        client.wait_for_workers(3, timeout=120)
        workers = client.scheduler_info(n_workers=-1)["workers"]
        names = {address: worker["name"] for address, worker in workers.items()}
        assert {names[a]: w["resources"] for a, w in workers.items()} == {
            "gpu0": {"GPU": 1},
            "gpu1": {"GPU": 1},
            "cpu0": {},
        }
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
        assert {names[address]: value for address, value in seen.items()} == {"gpu0": "0", "gpu1": "1", "cpu0": ""}

        with dask.annotate(resources={"GPU": 1}):  # as flows/pipeline.py submits a model-heavy stage
            placed = client.gather([client.submit(where_am_i, pure=False) for _ in range(6)])
    assert {worker for worker, _ in placed} <= {"gpu0", "gpu1"}
    # each task's child process saw only the GPU of the worker it ran on
    assert all(devices == {"gpu0": "0", "gpu1": "1"}[worker] for worker, devices in placed), placed


def test_no_visible_gpu_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    from dppa.cli import main

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["runtime"]["task_runner"] = "local-gpu-cluster:2"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    (tmp_path / ".dvc").mkdir()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, also on a machine that has some
    assert main(["run", "-C", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [
        "dppa run: error: runtime.task_runner: local-gpu-cluster:2: no GPU is visible here (CUDA_VISIBLE_DEVICES=''); "
        "on CPU use local-cluster:N, or give the address of a Dask scheduler whose workers have GPUs"
    ]
    # nothing written: no stage ran (DVC's status, read beside the check, may have made its .dvc/tmp)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("count", [0, None])
def test_zero_gpus_refused_by_the_runner(count, monkeypatch):
    from dppa.errors import DppaError

    if count is None:  # torch's own count, with every GPU hidden
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(DppaError, match="no GPU is visible here"):
        task_runner(Runtime(task_runner="local-gpu-cluster"), gpu_count=count)
