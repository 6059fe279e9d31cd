"""`dppa serve --cron EXPR`: run the pipeline on a schedule (a Prefect deployment served by this process)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dppa.cli import add_command

ORDER = 6
HELP = "run the pipeline on a cron schedule (Prefect deployment)"

DESCRIPTION = """\
Serve the pipeline as a Prefect deployment that runs on a cron schedule, for as long as this command runs
(stop it with Ctrl-C or SIGTERM). Each scheduled run is what `dppa run` does: stale stages only, then the report;
a hub model at a branch or tag is refetched when the branch moved upstream (see `dppa fetch --help`).
One run at a time: the deployment's concurrency limit is 1 (a run due while one is going is cancelled, or queued
with runtime.on_overlap: wait), and the project's run lock keeps out a `dppa run` started by hand meanwhile.
Each run is recorded in data/runs/ (a failed one with its stage and last log lines) and a failure is sent to
runtime.notify when it is set.
Runs are recorded by the Prefect server named in PREFECT_API_URL, else by a local Prefect server started for
as long as this command runs (its UI address is printed; the embedded API that `dppa run` uses has no
scheduler, so `serve` starts a full one).

examples:
  dppa serve --cron "0 2 * * *"                 # every night at 02:00 (server time)
  dppa serve --cron "*/30 * * * *" -C /srv/merge
"""


def run(args: argparse.Namespace) -> int:
    from dppa.cli.run import check_project
    from dppa.pipeline.config import load_params

    root = Path(args.project).resolve()
    check_project(root)
    params = load_params(root / "params.yaml")  # fail now, not at 2 a.m.
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from dppa.flows.pipeline import scheduled_pipeline
    from dppa.flows.runtime import prefect_server

    # One run of the deployment at a time, in Prefect too: a run due while another is going is cancelled (or, with
    # runtime.on_overlap: wait, queued), and the project's run lock keeps out runs started elsewhere.
    wait = params.runtime.on_overlap == "wait"
    one_at_a_time = ConcurrencyLimitConfig(
        limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE if wait else ConcurrencyLimitStrategy.CANCEL_NEW
    )
    with prefect_server() as url:
        print(f"Prefect API: {url} (UI at {url.removesuffix('/api')})", flush=True)
        scheduled_pipeline.serve(
            name=args.name, cron=args.cron, parameters={"root": str(root)}, global_limit=one_at_a_time
        )
    return 0


def register(subparsers) -> None:
    parser = add_command(subparsers, "serve", HELP, DESCRIPTION, run)
    parser.add_argument("--cron", required=True, help='cron expression, e.g. "0 2 * * *"')
    parser.add_argument("--name", default="dppa-scheduled", help="deployment name (default dppa-scheduled)")
    parser.add_argument("-C", "--project", default=".", help="project folder with dvc.yaml and params.yaml (default .)")
