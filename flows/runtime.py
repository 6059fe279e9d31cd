"""How flows run: the Prefect API they report to, the task runner chosen by params (and the local Dask cluster
of GPU workers it may start), the GPU concurrency limit.

Prefect's API is embedded: with no PREFECT_API_URL set, one temporary local server is started per pipeline run
and its address is put in the environment, so that the Dask workers report to the same API as the flow (one place
to see the run, one concurrency limit for all its stage tasks). The stages themselves use no Prefect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable

from dppa.tasks import GPU_TAG

from dppa.errors import DppaError, debugging
from dppa.pipeline import lifeline
from dppa.pipeline.config import Runtime
from dppa.pipeline.lifeline import children_die_with_us

API_URL_ENV = "PREFECT_API_URL"
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")  # where Prefect's engines record a failed run
CUDA_DEVICES_ENV = "CUDA_VISIBLE_DEVICES"
GPU_RESOURCE = "GPU"  # the Dask resource the model-heavy stages require (flows/pipeline.py)
# How long a stage that found the GPU slots taken waits before it asks again, on the servers started here. Prefect's
# default, up to 10 s, left 4-12 s gaps between the demo's model-heavy stages: 40 s of its 155 s after the zoo.
SLOT_WAIT_ENV = {"PREFECT_SERVER_TASKS_TAG_CONCURRENCY_SLOT_WAIT_SECONDS": "1"}


@contextlib.contextmanager
def prefect_api():
    """Use the configured Prefect API, or start a temporary local one for the duration of the block."""
    if os.environ.get(API_URL_ENV):
        yield os.environ[API_URL_ENV]
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    server = SubprocessASGIServer()
    # Prefect's settings may have been read before flows/__init__ set the longer start-up time: set it here too.
    # The server process must not outlive this one, even when this one is killed (dppa/pipeline/lifeline.py).
    settings = {PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 120, **SLOT_WAIT_ENV}
    with temporary_settings(updates=settings), children_die_with_us():
        server.start()
    os.environ[API_URL_ENV] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        drain_to_api()
        os.environ.pop(API_URL_ENV, None)
        server.stop()


class _WithoutTraceback(logging.Filter):
    """A failed stage is told by its own log lines and the run's one-line error; the frames of Prefect's engine
    around it (which is all a task's traceback holds: the stage ran in another process) are for --debug only."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def hide_run_tracebacks() -> None:
    """Keep tracebacks out of the records Prefect makes of failed flow and task runs, unless debugging."""
    if debugging():
        return
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _WithoutTraceback) for f in logger.filters):
            logger.addFilter(_WithoutTraceback())


def drain_to_api() -> None:
    """Send queued logs and events before the server goes away (else: "Error logging to API")."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)


@contextlib.contextmanager
def prefect_server(timeout_s: float = 180):
    """A full local Prefect server (scheduler included: the embedded one does not create scheduled runs) for the
    duration of the block, unless PREFECT_API_URL names one already. Its UI is at the printed address."""
    if os.environ.get(API_URL_ENV):
        yield os.environ[API_URL_ENV]
        return
    import socket
    import sys
    import time

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    server = lifeline.popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **SLOT_WAIT_ENV},
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Prefect server did not start on port {port}")
            time.sleep(1)
        os.environ[API_URL_ENV] = url
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        os.environ.pop(API_URL_ENV, None)
        server.terminate()
        server.wait(timeout=30)


def notifier(target: str | None) -> Callable[[str, str], None] | None:
    """runtime.notify as a function (subject, body) -> None that sends through Prefect's notification blocks:
    a saved block named "BLOCK-TYPE/NAME", or a webhook URL (a Custom Webhook block made here, never saved, that
    POSTs {"text", "subject", "body"} as JSON). None when no notification is configured.

    Its errors name neither the URL nor the block's settings (either may hold a token): only what went wrong."""
    if not target:
        return None

    def send(subject: str, body: str) -> None:
        import httpx
        from prefect.blocks.core import Block
        from prefect.blocks.notifications import CustomWebhookNotificationBlock

        if re.match(r"^https?://", target):
            block = CustomWebhookNotificationBlock(
                name="dppa",
                url=target,
                json_data={"text": "{{subject}}\n\n{{body}}", "subject": "{{subject}}", "body": "{{body}}"},
            )
        else:
            block = Block.load(target, _sync=True)
        try:
            block.notify(body=body, subject=subject, _sync=True)
        except httpx.HTTPStatusError as exc:
            raise RuntimeError(f"the receiver answered HTTP {exc.response.status_code}") from None
        except httpx.HTTPError as exc:
            raise RuntimeError(f"the receiver could not be reached ({type(exc).__name__})") from None

    return send


def configured_notify(root: str | os.PathLike) -> str | None:
    """runtime.notify read from params.yaml without checking the rest, so that a params.yaml that fails its check
    can still be reported to people."""
    from dppa.pipeline.params_check import unchecked_runtime

    notify = unchecked_runtime(root).get("notify")
    return notify if isinstance(notify, str) else None


def set_gpu_limit(limit: int) -> None:
    """(Re)create the tag concurrency limit on GPU-tagged tasks. Recreating it at the start of a run also drops
    slots that a killed run may still hold."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        with contextlib.suppress(ObjectNotFound):
            client.delete_concurrency_limit_by_tag(GPU_TAG)
        client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=limit)


def visible_gpus(count: int | None = None) -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (one per worker to pin): the first `count`
    of CUDA_VISIBLE_DEVICES when it is set (torch renumbers those from 0; a worker needs their real names), else
    0..count-1. `count` defaults to torch.cuda.device_count()."""
    if count is None:
        import torch

        count = torch.cuda.device_count()
    listed = os.environ.get(CUDA_DEVICES_ENV)
    if listed is None:
        return [str(index) for index in range(count)]
    return [entry.strip() for entry in listed.split(",") if entry.strip()][:count]


def gpu_cluster_workers(gpus: list[str], cpu_workers: int) -> dict[str, dict]:
    """SpecCluster worker specs: one worker process per GPU, which sees only that GPU and declares the resource
    GPU=1, and `cpu_workers` that see no GPU and declare nothing. One thread each: a task is one stage, which
    the worker waits for while its own process (DVC's, which inherits the worker's environment) does the work."""
    from distributed import Nanny

    def spec(devices: str, resources: dict[str, int]) -> dict:
        # A Nanny sets `env` in the worker process before the worker starts, so before anything there uses CUDA
        options = {"nthreads": 1, "resources": resources, "env": {CUDA_DEVICES_ENV: devices}}
        return {"cls": Nanny, "options": options}

    workers = {f"gpu{index}": spec(device, {GPU_RESOURCE: 1}) for index, device in enumerate(gpus)}
    workers.update({f"cpu{index}": spec("", {}) for index in range(cpu_workers)})
    return workers


def local_gpu_cluster(gpus: list[str], cpu_workers: int):
    """The Dask cluster of runtime.task_runner local-gpu-cluster[:N] (see `gpu_cluster_workers`)."""
    from distributed import Scheduler, SpecCluster

    return SpecCluster(
        scheduler={"cls": Scheduler, "options": {"dashboard_address": None}},
        workers=gpu_cluster_workers(gpus, cpu_workers),
        name="dppa-local-gpu-cluster",
    )


def gpus_for(runtime: Runtime, gpu_count: int | None = None) -> list[str]:
    """The GPUs runtime.task_runner local-gpu-cluster[:N] gets (none for another runner); refused where none is
    visible. Cheap (no Prefect, no Dask): `dppa run` asks before any work."""
    if runtime.gpu_cluster_cpu_workers() is None:
        return []
    gpus = visible_gpus(gpu_count)
    if not gpus:
        hidden = f" ({CUDA_DEVICES_ENV}={os.environ[CUDA_DEVICES_ENV]!r})" if CUDA_DEVICES_ENV in os.environ else ""
        raise DppaError(
            f"runtime.task_runner: {runtime.task_runner}: no GPU is visible here{hidden}; on CPU use "
            "local-cluster:N, or give the address of a Dask scheduler whose workers have GPUs"
        )
    return gpus


def task_runner(runtime: Runtime, gpu_count: int | None = None):
    """runtime.task_runner: threads | local-cluster:N | local-gpu-cluster[:N] | a Dask scheduler address.

    `gpu_count`: the GPUs local-gpu-cluster uses (default: torch.cuda.device_count()). Nothing starts here: a
    Dask cluster starts when the flow does."""
    spec = runtime.task_runner
    if spec == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=runtime.concurrency)
    from prefect_dask import DaskTaskRunner

    if spec.startswith("local-cluster:"):
        workers = int(spec.split(":", 1)[1])
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": workers,
                "processes": True,
                "threads_per_worker": 1,
                "dashboard_address": None,
            },
        )
    cpu_workers = runtime.gpu_cluster_cpu_workers()
    if cpu_workers is not None:
        gpus = gpus_for(runtime, gpu_count)
        return DaskTaskRunner(
            cluster_class=local_gpu_cluster, cluster_kwargs={"gpus": gpus, "cpu_workers": cpu_workers}
        )
    return DaskTaskRunner(address=spec)
