"""The whole pipeline as one Prefect flow. Its stage graph is read from dvc.yaml (through DVC's own index), not
written here a second time: each stage is submitted as a task once the stages it depends on are done, so the
per-fine-tune branches run side by side, on threads or on Dask workers (runtime.task_runner)."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger

from tasks.dvc import repro_stage


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
def pipeline_flow(root: str = ".") -> dict[str, str]:
    """Run every stale stage of dvc.yaml in dependency order; returns {stage: "ran" | "restored" | "up to date"}."""
    logger = get_run_logger()
    root_path = Path(root).resolve()
    graph = stage_graph(root_path)
    started = time.perf_counter()
    futures = {}
    for stage, upstream in graph.items():
        futures[stage] = repro_stage.submit(root_path, stage, wait_for=[futures[u] for u in upstream])
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
            return pipeline_flow.with_options(task_runner=task_runner(params.runtime))(root)
    except RunSkipped as skipped:
        logger.warning(str(skipped))
        return {}
