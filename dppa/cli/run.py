"""`dppa run`: the whole pipeline of dvc.yaml on params.yaml, through Prefect, then the results table."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dppa.cli import add_command
from dppa.errors import DppaError

ORDER = 5
HELP = "run the whole pipeline (dvc.yaml + params.yaml) through Prefect and print the results"

DESCRIPTION = """\
Run the pipeline: every stage of dvc.yaml that is stale (DVC decides, as `dvc repro` would), as Prefect tasks in
dependency order, the per-fine-tune branches side by side; then print the results table (also written to
the report stage's scores.md and .csv, with plots). A hub model given at a branch or tag is asked about first
(one API call): if the branch moved upstream, its fetch reruns, and with it what depends on that model. When no
model follows a branch and `dvc status` finds nothing stale, nothing is started (no Prefect API, no task runner):
the table is printed at once. Otherwise a stage that is up to date, and downstream of no stage that runs, is
reported so without starting DVC for it.

Hub models live outside DVC, in the models store: $DPPA_MODELS_DIR, else ~/.cache/dppa/models (one folder per
commit, shared by every project on the machine; delete what you no longer need). DVC tracks only each model's
record (commit and file hashes), so `dvc pull` brings no model: a stage that needs one missing from the store
downloads the recorded commit first and checks every file against the record.

The configuration is PROJECT/params.yaml, checked before any work. Where the stages run is runtime.task_runner:
  threads               local threads (default; runtime.concurrency of them)
  local-cluster:N       a Dask LocalCluster of N worker processes on this machine
  local-gpu-cluster[:N] a Dask cluster on this machine of one worker per visible GPU (as counted by torch,
                        within CUDA_VISIBLE_DEVICES), each seeing only its GPU, plus N CPU-only workers that see
                        none (default 0); refused where no GPU is visible
  tcp://HOST:8786       an existing Dask scheduler (workers must see the project folder at the same path)
With runtime.gpu_resource (default: when runtime.device is cuda or the runner is local-gpu-cluster) the
model-heavy stages (zoo, amplify, score, merge, evaluate) run only on Dask workers that declare the resource GPU;
fetch, extract, prune and report run on any worker. Each GPU's stages then run one at a time; set
runtime.gpu_concurrency to the number of GPUs so that they run side by side. On one machine with GPUs:
  runtime: {task_runner: "local-gpu-cluster:2", device: auto, gpu_concurrency: 8}   # 8 GPUs, 2 CPU workers
Across machines, start a scheduler and workers by hand, one worker per GPU:
  dask scheduler --port 8786 &                                                    # on HOST
  CUDA_VISIBLE_DEVICES=0 dask worker tcp://HOST:8786 --nthreads 1 --resources GPU=1 &
  CUDA_VISIBLE_DEVICES=1 dask worker tcp://HOST:8786 --nthreads 1 --resources GPU=1 &
  CUDA_VISIBLE_DEVICES= dask worker tcp://HOST:8786 --nworkers 2 --nthreads 1 &   # CPU-only workers
  then runtime: {task_runner: tcp://HOST:8786, gpu_resource: true, device: auto}: extract and prune follow
  runtime.device, so device: cuda needs every worker to see a GPU (no CPU-only workers)
No Prefect server is needed: a temporary local one records the run unless PREFECT_API_URL names one.

Each run leaves a record in data/runs/latest.json (and a line in data/runs/history.jsonl): status, the stage
that failed with its error and last log lines, start and end time, the sha256 of params.yaml. A failed run exits
with status 1 and prints the failing stage and its last log lines; with runtime.notify set it is also sent to
people through a Prefect notification block or a webhook.

examples:
  dppa run                         # the demo: builds the zoo if missing, merges it with DPPA, prints the table
  dppa run -C ~/src/dppa-nightly   # another checkout of this repository (its stages depend on its code)
  dvc metrics show; dvc plots show # the same results through DVC
"""


def check_project(root: Path) -> None:
    for required, hint in (
        ("dvc.yaml", "the stage graph"),
        ("params.yaml", "the configuration"),
        (".dvc", "a DVC repository: run `dvc init`"),
    ):
        if not (root / required).exists():
            raise DppaError(f"{root / required}: missing ({hint}); run from the project folder or pass -C PROJECT")


def check_params(root: Path) -> bool:
    """params.yaml checked as a run needs it (DppaError naming the problems); whether a model follows a hub branch."""
    from dppa.flows.runtime import gpus_for
    from dppa.pipeline.config import load_params

    params = load_params(root / "params.yaml")
    gpus_for(params.runtime)  # refuses local-gpu-cluster where no GPU is visible
    return params.follows_hub_branch(root)


def run_pipeline(root: Path) -> tuple[dict[str, str], dict[str, Path]]:
    """Check params, then run the pipeline flow with the task runner they choose; returns ({stage: outcome}, the
    outputs of the stages it prints: report, publish).

    When nothing is stale, no Prefect API, task runner or stage process is started: every stage is up to date,
    which is all the flow would find (in seconds instead of the tens of seconds those cost). The params check runs
    beside DVC's status (dppa/pipeline/params_check.py); no stage runs before it passes."""
    from dppa.pipeline.params_check import ParamsCheck, on_overlap
    from dppa.pipeline.run_lock import run_lock
    from dppa.pipeline.stage_graph import read_stage_graph

    checking = ParamsCheck(root, check_params)
    try:
        with run_lock(root, on_overlap=on_overlap(root), command="dppa run"):
            try:
                stages = read_stage_graph(root)
            except Exception:
                checking.result()  # a params.yaml problem is what a user sees first (DVC's may follow from it)
                raise
            # A model at a hub branch may have moved: only the flow asks the hub, so there is no quick answer then.
            if not checking.result() and not stages.stale:
                return dict.fromkeys(stages.upstream, "up to date"), stages.shown
            return _run_flow(root, stages), stages.shown
    finally:
        checking.cancel()


def _run_flow(root: Path, stages) -> dict[str, str]:
    from dppa.flows.pipeline import pipeline_flow
    from dppa.flows.runtime import notifier, prefect_api, set_gpu_limit, task_runner
    from dppa.pipeline.config import load_params
    from dppa.pipeline.run_record import recorded_run
    from dppa.pipeline.stage_server import warm_stages

    params = load_params(root / "params.yaml")  # (checked already: this process's copy, for the flow)
    runner = task_runner(params.runtime)  # starts nothing
    with warm_stages(dvc=True), prefect_api(), recorded_run(root, "dppa run") as record:
        record.notify = notifier(params.runtime.notify)
        set_gpu_limit(params.runtime.gpu_concurrency)
        flow = pipeline_flow.with_options(task_runner=runner)
        record.stages = flow(str(root), gpu_resource=params.runtime.needs_gpu_resource(), stages=stages)
        return record.stages


def run(args: argparse.Namespace) -> int:
    root = Path(args.project).resolve()
    check_project(root)
    started = time.perf_counter()
    outcome, outputs = run_pipeline(root)
    ran = [stage for stage, result in outcome.items() if result == "ran"]
    elapsed = time.perf_counter() - started
    print(f"\n{len(ran)} of {len(outcome)} stages ran ({elapsed:.0f} s): {', '.join(ran) or 'none'}")
    if "report" in outputs:
        table = outputs["report"] / "scores.md"
        print(table.read_text() if table.exists() else f"{table}: no report was written")
    record = outputs.get("publish")
    if record is not None:
        print(publish_line(record))
    return 0


def publish_line(record: Path) -> str:
    """What the publish stage did, in one line (a refusal by the gate included)."""
    import json

    if not record.exists():
        return "Publish: no record (the publish stage has not run)"
    body = json.loads(record.read_text())
    if not body.get("repo"):
        return f"Publish: off ({body.get('reason', 'publish.repo is null')})"
    commit = f" (commit {body['commit']})" if body.get("commit") else ""
    return f"Publish {body['repo']}@{body['revision']}: {body['reason']}{commit}"


def register(subparsers) -> None:
    parser = add_command(subparsers, "run", HELP, DESCRIPTION, run)
    parser.add_argument("-C", "--project", default=".", help="project folder with dvc.yaml and params.yaml (default .)")
