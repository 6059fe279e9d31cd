"""The whole pipeline as one Prefect flow. Its stage graph is read from dvc.yaml (through DVC's own index), not
written here a second time: each stage is submitted as a task once the stages it depends on are done, so the
per-fine-tune branches run side by side, on threads or on Dask workers (runtime.task_runner).

On Dask, the model-heavy stages (those that train, evaluate or search models, and the merge) can require the Dask
resource GPU: they then run only on workers started with `--resources GPU=1` (one per GPU), while the CPU stages
(fetch, extract, prune, report) run on any worker. `runtime.gpu_resource` decides (unset: when runtime.device is
cuda); the threads runner ignores it.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger

from dppa.errors import DppaError
from tasks.dvc import repro_stage

GPU_RESOURCE = "GPU"
# dvc.yaml stages (per fine-tune ones without their @NAME) whose work is models on a device: the zoo trains them,
# amplify searches factors by evaluating candidates, score and evaluate evaluate, merge searches its scale
MODEL_HEAVY_STAGES = frozenset({"zoo", "amplify", "score", "merge", "evaluate"})


def is_model_heavy(stage: str) -> bool:
    """`stage` as DVC addresses it: NAME, NAME@KEY for a foreach stage, or FILE:NAME in another dvc.yaml."""
    return stage.rsplit(":", 1)[-1].split("@", 1)[0] in MODEL_HEAVY_STAGES


def stage_resources(stage: str, gpu_resource: bool) -> dict[str, int] | None:
    """The Dask resources a stage's task requires, or None (any worker)."""
    return {GPU_RESOURCE: 1} if gpu_resource and is_model_heavy(stage) else None


def check_gpu_workers() -> None:
    """On a Dask task runner, refuse to start when no worker declares the GPU resource: GPU stages would wait
    for one forever."""
    from prefect.context import FlowRunContext
    from prefect_dask import DaskTaskRunner

    runner = FlowRunContext.get().task_runner
    if not isinstance(runner, DaskTaskRunner):
        return
    workers = runner.client.scheduler_info(n_workers=-1)["workers"]
    if not any(w.get("resources", {}).get(GPU_RESOURCE, 0) >= 1 for w in workers.values()):
        raise DppaError(
            f"runtime.gpu_resource: none of the {len(workers)} Dask workers declares the resource {GPU_RESOURCE}; "
            f"start one worker per GPU with `dask worker SCHEDULER --resources {GPU_RESOURCE}=1`, or set "
            "runtime.gpu_resource: false"
        )


def submit_stage(root: Path, stage: str, wait_for: list, gpu_resource: bool):
    resources = stage_resources(stage, gpu_resource)
    if resources is None:
        return repro_stage.submit(root, stage, wait_for=wait_for)
    import dask

    # read by the Dask client when the task is submitted (the threads runner ignores it)
    with dask.annotate(resources=resources):
        return repro_stage.submit(root, stage, wait_for=wait_for)


def stage_graph(root: Path) -> dict[str, list[str]]:
    """{stage name: names of the stages it depends on}, in a topological order (dependencies first)."""
    import networkx as nx
    from dvc.repo import Repo

    def address(stage) -> str:
        # DVC's own `addressing` is relative to the working folder, which need not be the project.
        dvcfile = Path(stage.dvcfile.path).resolve()
        return stage.name if dvcfile == root / "dvc.yaml" else f"{dvcfile.relative_to(root)}:{stage.name}"

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        # The pipeline is the project's dvc.yaml (and whatever it depends on), not every dvc.yaml in the
        # repository: experiments may keep their own stage files in subfolders.
        mine = {s for s in graph if Path(s.dvcfile.path).resolve() == root / "dvc.yaml"}
        wanted = mine.union(*(nx.descendants(graph, s) for s in mine))
        graph = graph.subgraph(wanted)
        order = list(reversed(list(nx.topological_sort(graph))))
        return {address(stage): [address(up) for up in graph.successors(stage)] for stage in order}


@flow(name="dppa-pipeline")
def pipeline_flow(root: str = ".", gpu_resource: bool = False) -> dict[str, str]:
    """Run every stale stage of dvc.yaml in dependency order; returns {stage: "ran" | "restored" | "up to date"}.
    `gpu_resource`: the model-heavy stages require a Dask worker with the resource GPU."""
    logger = get_run_logger()
    root_path = Path(root).resolve()
    graph = stage_graph(root_path)
    if gpu_resource:
        check_gpu_workers()
    started = time.perf_counter()
    futures = {}
    for stage, upstream in graph.items():
        futures[stage] = submit_stage(root_path, stage, [futures[u] for u in upstream], gpu_resource)
    outcome = {stage: future.result() for stage, future in futures.items()}
    ran = [s for s, o in outcome.items() if o == "ran"]
    elapsed = time.perf_counter() - started
    logger.info(f"{len(ran)} of {len(outcome)} stages ran in {elapsed:.1f} s: {', '.join(ran) or 'none'}")
    return outcome


@flow(name="dppa-scheduled")
def scheduled_pipeline(root: str) -> dict[str, str]:
    """What `dppa serve` runs: reads params.yaml at run time (so edits apply to the next run), then the pipeline
    with the task runner and GPU limit they choose."""
    from dppa.pipeline.config import load_params
    from dppa.pipeline.run_lock import RunSkipped, run_lock
    from flows.runtime import set_gpu_limit, task_runner

    params = load_params(Path(root) / "params.yaml")
    logger = get_run_logger()
    try:
        with run_lock(
            root,
            on_overlap=params.runtime.on_overlap or "skip",
            command="dppa serve (scheduled run)",
            log=logger.warning,
        ):
            set_gpu_limit(params.runtime.gpu_concurrency)
            flow_ = pipeline_flow.with_options(task_runner=task_runner(params.runtime))
            return flow_(root, gpu_resource=params.runtime.needs_gpu_resource())
    except RunSkipped as skipped:
        logger.warning(str(skipped))
        return {}
