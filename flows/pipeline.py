"""The whole pipeline as one Prefect flow. Its stage graph is read from dvc.yaml (through DVC's own index), not
written here a second time: each stage is submitted as a task once the stages it depends on are done, so the
per-fine-tune branches run side by side, on threads or on Dask workers (runtime.task_runner).

On Dask, the model-heavy stages (MODEL_HEAVY_STAGES below, the one definition of the term) can require the Dask
resource GPU: they then run only on workers started with `--resources GPU=1` (one per GPU), while the others
(fetch, extract, prune, report: they stream tensors and never load a model) run on any worker.
`runtime.gpu_resource` decides (unset: when runtime.device is cuda); the threads runner ignores it.
"""

from __future__ import annotations

import time
from pathlib import Path

from dppa.flows.runtime import GPU_RESOURCE, hide_run_tracebacks
from dppa.tasks import GPU_TAG
from dppa.tasks.dvc import repro_stage, up_to_date
from prefect import flow, get_run_logger
from prefect.futures import wait

from dppa.errors import DppaError
from dppa.pipeline.run_record import StageFailed
from dppa.pipeline.stage_graph import read_stage_graph, will_change

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


def submit_stage(root: Path, stage: str, wait_for: list, gpu_resource: bool, force: bool = False):
    """One Prefect task per stage; a model-heavy one carries the GPU tag (runtime.gpu_concurrency of them at once)
    and, on Dask with `gpu_resource`, needs a worker with the GPU resource."""
    task = repro_stage.with_options(tags=[GPU_TAG]) if is_model_heavy(stage) else repro_stage
    resources = stage_resources(stage, gpu_resource)
    if resources is None:
        return task.submit(root, stage, force=force, wait_for=wait_for)
    import dask

    # read by the Dask client when the task is submitted (the threads runner ignores it)
    with dask.annotate(resources=resources):
        return task.submit(root, stage, force=force, wait_for=wait_for)


def moved_branches(root: Path, fetches: dict[str, Path]) -> set[str]:
    """The fetch stages whose hub model names a branch or tag that now points at another commit than the one
    fetched. DVC cannot see that (params.yaml still says `revision: main`), so these stages are forced to rerun;
    their new record then makes what depends on it stale, as any changed input does. One API call per hub model
    with a branch or tag revision; none for pinned commits, zoo or local models."""
    from dppa.pipeline.config import load_params
    from dppa.pipeline.hub import followed_revision
    from dppa.stages.models import current_commit

    if not fetches:  # a stage graph without fetch stages (and maybe without params.yaml): nothing to ask
        return set()
    logger = get_run_logger()
    wanted = load_params(root / "params.yaml").hub_revisions(root)
    moved = set()
    for stage, out in fetches.items():
        record = followed_revision(out, wanted)
        if record is None:
            continue
        now = current_commit(record["source"], record["revision"])
        if now != record["commit"]:
            where = f"{record['source']}@{record['revision']}"
            logger.info(f"{stage}: {where} moved upstream from commit {record['commit']} to {now}; fetching it")
            moved.add(stage)
    return moved


NOT_RUN = "not run"  # an upstream stage failed


@flow(name="dppa-pipeline")
def pipeline_flow(root: str = ".", gpu_resource: bool = False, stages=None) -> dict[str, str]:
    """Run every stale stage of dvc.yaml in dependency order, and the fetch of every hub model whose branch moved
    upstream; returns {stage: "ran" | "restored" | "up to date"}. When stages fail, the stages independent of them
    still run, and then StageFailed names the first (in the graph's order) with the last lines of its log.
    `gpu_resource`: the model-heavy stages require a Dask worker with the resource GPU. `stages`: DVC's reading of
    them (a StageGraph) when the caller has one (`dppa run` reads it before it starts anything); else it is read
    here (not annotated: the parameter model Prefect builds for a served deployment's run could not resolve the
    class). A stage that DVC finds up to date and that depends on no stage that runs is reported so without a DVC
    process of its own."""
    hide_run_tracebacks()
    logger = get_run_logger()
    root_path = Path(root).resolve()
    stages = stages or read_stage_graph(root_path)
    if gpu_resource:
        check_gpu_workers()
    forced = moved_branches(root_path, stages.fetches)
    to_run = will_change(stages.upstream, stages.stale | forced)
    started = time.perf_counter()
    futures = {}
    for stage, upstream in stages.upstream.items():
        wait_for = [futures[u] for u in upstream]
        if stage in to_run:
            futures[stage] = submit_stage(root_path, stage, wait_for, gpu_resource, stage in forced)
        else:
            futures[stage] = up_to_date.submit(stage, wait_for=wait_for)
    wait(list(futures.values()))
    outcome, failures = {}, []
    for stage, future in futures.items():
        if future.state.is_completed():
            outcome[stage] = future.result()
        elif future.state.is_failed() or future.state.is_crashed():
            failures.append(future.result(raise_on_failure=False))
            outcome[stage] = "failed"
        else:
            outcome[stage] = NOT_RUN
    ran = [s for s, o in outcome.items() if o == "ran"]
    elapsed = time.perf_counter() - started
    logger.info(f"{len(ran)} of {len(outcome)} stages ran in {elapsed:.1f} s: {', '.join(ran) or 'none'}")
    if failures:
        first = failures[0]
        if isinstance(first, StageFailed):
            others = tuple(f.stage for f in failures[1:] if isinstance(f, StageFailed))
            raise StageFailed(first.stage, first.returncode, first.tail, also=others, outcome=outcome)
        raise first if isinstance(first, BaseException) else RuntimeError(f"a stage failed: {first!r}")
    return outcome


@flow(name="dppa-scheduled")
def scheduled_pipeline(root: str) -> dict[str, str]:
    """What `dppa serve` runs: reads params.yaml at run time (so edits apply to the next run), then the pipeline
    with the task runner and GPU limit they choose."""
    from dppa.flows.runtime import configured_notify, notifier, set_gpu_limit, task_runner

    from dppa.pipeline.config import load_params
    from dppa.pipeline.run_lock import RunSkipped, run_lock
    from dppa.pipeline.run_record import recorded_run
    from dppa.pipeline.stage_server import warm_stages

    logger = get_run_logger()
    command = "dppa serve (scheduled run)"
    try:
        with recorded_run(root, command, log=logger.warning) as record:
            record.notify = notifier(configured_notify(root))  # a params.yaml that fails its check is reported too
            params = load_params(Path(root) / "params.yaml")
            record.notify = notifier(params.runtime.notify)
            with run_lock(root, on_overlap=params.runtime.on_overlap or "skip", command=command, log=logger.warning):
                set_gpu_limit(params.runtime.gpu_concurrency)
                flow_ = pipeline_flow.with_options(task_runner=task_runner(params.runtime))
                with warm_stages(dvc=True):
                    record.stages = flow_(root, gpu_resource=params.runtime.needs_gpu_resource())
                return record.stages
    except RunSkipped as skipped:
        logger.warning(str(skipped))
        return {}
