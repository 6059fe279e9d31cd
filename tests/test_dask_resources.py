"""Model-heavy stages on GPU workers: the pipeline flow, real DVC, real Prefect (embedded API) and a real Dask
cluster of two worker processes, only one of which declares the resource GPU. No GPU is needed: a Dask resource is
a label the scheduler matches, not a device.

The project is a stand-in with the pipeline's stage names (per-fine-tune stages as foreach stages, as in dvc.yaml)
whose commands write the name of the worker process they ran under (each worker's environment names it), or,
on the local GPU cluster, the GPUs the stage's process could see.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dppa.flows.pipeline import is_model_heavy, stage_resources

from dppa.errors import DppaError

PER_FINETUNE = ("fetch", "extract", "prune", "amplify", "score")
FINETUNES = ("a", "b")
WORKER_ENV = "DPPA_TEST_WORKER"
WHERE = f"""\
import os, sys
from pathlib import Path
Path("out").mkdir(exist_ok=True)
where = os.environ.get("{WORKER_ENV}") or "cuda:" + os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
Path("out", sys.argv[1] + ".txt").write_text(where)
"""


def test_model_heavy_stages_by_address():
    heavy = ["zoo", "amplify@math", "score@law", "merge", "evaluate", "sub/dvc.yaml:evaluate"]
    light = ["fetch_base", "fetch@math", "extract@law", "prune@math", "report", "sub/dvc.yaml:extract@x"]
    assert [is_model_heavy(s) for s in heavy] == [True] * len(heavy)
    assert [is_model_heavy(s) for s in light] == [False] * len(light)
    assert stage_resources("evaluate", gpu_resource=True) == {"GPU": 1}
    assert stage_resources("evaluate", gpu_resource=False) is None
    assert stage_resources("extract@math", gpu_resource=True) is None


def stand_in_project(folder: Path) -> Path:
    """zoo -> fetch@X -> extract@X -> prune@X -> amplify@X -> score@X; amplify@* -> merge -> evaluate -> report."""
    folder.mkdir(parents=True)
    (folder / "where.py").write_text(WHERE)

    def stage(name: str, deps: list[str]) -> dict:
        return {"cmd": f"python where.py {name}", "deps": ["where.py", *deps], "outs": [f"out/{name}.txt"]}

    stages = {"zoo": stage("zoo", [])}
    upstream = {"fetch": "zoo", "extract": "fetch-${item}", "prune": "extract-${item}", "amplify": "prune-${item}"}
    upstream["score"] = "amplify-${item}"
    for name in PER_FINETUNE:
        stages[name] = {"foreach": list(FINETUNES), "do": stage(f"{name}-${{item}}", [f"out/{upstream[name]}.txt"])}
    stages["merge"] = stage("merge", [f"out/amplify-{ft}.txt" for ft in FINETUNES])
    stages["evaluate"] = stage("evaluate", ["out/merge.txt"])
    stages["report"] = stage("report", ["out/evaluate.txt", *(f"out/score-{ft}.txt" for ft in FINETUNES)])
    (folder / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=folder, check=True)
    return folder


def cluster(**workers: dict):
    """A Dask cluster of one worker process per keyword (its name), each with one thread and these options."""
    from distributed import Nanny, Scheduler, SpecCluster

    return SpecCluster(
        scheduler={"cls": Scheduler, "options": {"dashboard_address": None}},
        workers={
            name: {"cls": Nanny, "options": {"nthreads": 1, "env": {WORKER_ENV: name}, **options}}
            for name, options in workers.items()
        },
    )


def run_on(cluster_, project: Path, gpu_resource: bool) -> dict[str, str]:
    from dppa.flows.pipeline import pipeline_flow
    from prefect_dask import DaskTaskRunner

    runner = DaskTaskRunner(address=cluster_.scheduler_address)
    return pipeline_flow.with_options(task_runner=runner)(str(project), gpu_resource=gpu_resource)


@pytest.mark.slow
def test_model_heavy_stages_run_only_on_the_gpu_worker(tmp_path, prefect_api):
    project = stand_in_project(tmp_path / "project")
    with cluster(gpu={"resources": {"GPU": 1}}, cpu={}) as dask_cluster:
        from distributed import Client

        with Client(dask_cluster) as client:
            declared = {w["name"]: w["resources"] for w in client.scheduler_info(n_workers=-1)["workers"].values()}
        assert declared == {"gpu": {"GPU": 1}, "cpu": {}}
        outcome = run_on(dask_cluster, project, gpu_resource=True)
    assert set(outcome.values()) == {"ran"} and len(outcome) == 1 + 2 * len(PER_FINETUNE) + 3
    placed = {p.stem: p.read_text() for p in (project / "out").glob("*.txt")}
    heavy = {name: worker for name, worker in placed.items() if is_model_heavy(name.split("-")[0])}
    light = {name: worker for name, worker in placed.items() if name not in heavy}
    assert sorted(heavy) == sorted(
        ["zoo", "merge", "evaluate", *(f"{s}-{f}" for s in ("amplify", "score") for f in "ab")]
    )
    assert set(heavy.values()) == {"gpu"}, heavy
    # CPU stages go anywhere: while the GPU worker is busy, the other one takes them
    assert set(light.values()) <= {"gpu", "cpu"} and "cpu" in light.values(), light


@pytest.mark.slow
def test_no_gpu_worker_is_refused_before_any_stage_runs(tmp_path, prefect_api):
    project = stand_in_project(tmp_path / "project")
    with cluster(cpu={}) as dask_cluster:
        with pytest.raises(DppaError, match="none of the 1 Dask workers declares the resource GPU"):
            run_on(dask_cluster, project, gpu_resource=True)
        assert not (project / "out").exists()
        # without the requirement the same cluster runs every stage
        assert set(run_on(dask_cluster, project, gpu_resource=False).values()) == {"ran"}
    assert {p.read_text() for p in (project / "out").glob("*.txt")} == {"cpu"}


@pytest.mark.slow
def test_local_gpu_cluster_runs_model_heavy_stages_each_on_one_gpu(tmp_path, prefect_api, monkeypatch):
    """runtime.task_runner local-gpu-cluster:1 with two GPUs (given, none needed): the pipeline's stage processes
    see the one GPU of the worker they ran on; the model-heavy ones never run on the CPU-only worker."""
    from dppa.flows.pipeline import pipeline_flow
    from dppa.flows.runtime import task_runner

    from dppa.pipeline.config import Runtime

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    project = stand_in_project(tmp_path / "project")
    runtime = Runtime(task_runner="local-gpu-cluster:1")
    runner = task_runner(runtime, gpu_count=2)
    outcome = pipeline_flow.with_options(task_runner=runner)(str(project), gpu_resource=runtime.needs_gpu_resource())
    assert set(outcome.values()) == {"ran"} and len(outcome) == 1 + 2 * len(PER_FINETUNE) + 3
    placed = {p.stem: p.read_text() for p in (project / "out").glob("*.txt")}
    heavy = {name: seen for name, seen in placed.items() if is_model_heavy(name.split("-")[0])}
    assert len(heavy) == 7 and set(heavy.values()) <= {"cuda:0", "cuda:1"}, heavy
    assert set(placed.values()) <= {"cuda:0", "cuda:1", "cuda:"}, placed  # "cuda:": a CPU-only worker


@pytest.mark.slow
def test_the_api_started_for_a_run_has_stages_ask_for_a_gpu_slot_again_within_a_second(prefect_api):
    # Prefect's default (up to 10 s between asks) left 4-12 s gaps between the demo's model-heavy stages
    import psutil

    servers = [p for p in psutil.Process().children(recursive=True) if "uvicorn" in " ".join(p.cmdline())]
    assert len(servers) == 1
    assert float(servers[0].environ().get("PREFECT_SERVER_TASKS_TAG_CONCURRENCY_SLOT_WAIT_SECONDS", "nan")) == 1.0
