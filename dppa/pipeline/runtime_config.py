"""params.yaml's `runtime` section: where and how the pipeline's stages run (device, task runner, concurrency,
overlapping runs, notifications)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from dppa.pipeline.strict import Strict


class Runtime(Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # "threads" | "local-cluster:N" (a Dask LocalCluster of N worker processes) | "local-gpu-cluster[:N]" (one
    # Dask worker per visible GPU, pinned to it, plus N CPU-only workers, default 0) | a Dask scheduler address
    task_runner: str = "threads"
    concurrency: int = Field(default=2, ge=1)
    gpu_concurrency: int = Field(default=1, ge=1)
    # On Dask: the model-heavy stages run only on workers started with `--resources GPU=1`. Unset: when device is
    # cuda or the runner is local-gpu-cluster. The threads runner ignores it.
    gpu_resource: bool | None = None
    # When another run holds the project: fail at once naming it, skip this run, or wait for it. Unset: fail for
    # a run started by hand, skip for a scheduled one (the next schedule picks the work up).
    on_overlap: Literal["wait", "skip", "fail"] | None = None
    # Where a failed run is sent (off when unset): a Prefect notification block saved as "BLOCK-TYPE/NAME" (its
    # secrets stay in Prefect), or a webhook URL that receives a JSON POST.
    notify: str | None = None

    @field_validator("notify")
    @classmethod
    def _notify(cls, value: str | None) -> str | None:
        if value is None or re.match(r"^https?://[^\s]+$", value) or re.match(r"^[a-z0-9-]+/[\w.-]+$", value):
            return value
        raise ValueError(
            "use a Prefect notification block as BLOCK-TYPE/NAME (e.g. slack-webhook/nightly) or an http(s) webhook URL"
        )  # the value is not repeated: a webhook URL may hold a secret

    def gpu_cluster_cpu_workers(self) -> int | None:
        """The CPU-only workers of `local-gpu-cluster[:N]`; None for any other task runner."""
        found = re.match(r"^local-gpu-cluster(?::(\d+))?$", self.task_runner)
        return None if found is None else int(found.group(1) or 0)

    def needs_gpu_resource(self) -> bool:
        if self.gpu_resource is not None:
            return self.gpu_resource
        return self.device == "cuda" or self.gpu_cluster_cpu_workers() is not None

    @field_validator("task_runner")
    @classmethod
    def _runner(cls, value: str) -> str:
        if value == "threads" or re.match(r"^local-cluster:[1-9]\d*$", value):
            return value
        if re.match(r"^local-gpu-cluster(:(0|[1-9]\d*))?$", value):
            return value
        if re.match(r"^(tcp|tls|inproc|ucx)://", value):
            return value
        raise ValueError(
            f"{value!r}: use threads, local-cluster:N, local-gpu-cluster[:N] or a Dask scheduler address "
            "tcp://host:port"
        )

    @model_validator(mode="after")
    def _gpu_cluster(self):
        cpu_workers = self.gpu_cluster_cpu_workers()
        if cpu_workers is None:
            return self
        if self.device == "cpu":
            raise ValueError(
                f"task_runner {self.task_runner} puts the model-heavy stages on GPUs but device is cpu: "
                "set device: auto or cuda, or use task_runner: local-cluster:N"
            )
        if self.gpu_resource is False:
            raise ValueError(
                f"task_runner {self.task_runner} with gpu_resource: false would let model-heavy stages run on "
                "CPU-only workers: leave gpu_resource unset"
            )
        if cpu_workers and self.device == "cuda":
            # extract and prune follow runtime.device, and a CPU-only worker sees no GPU
            raise ValueError(
                f"task_runner {self.task_runner}: its {cpu_workers} CPU-only workers see no GPU, so extract and "
                "prune there cannot use device cuda: set device: auto (GPU workers use their GPU, CPU-only "
                "workers the CPU) or use local-gpu-cluster without :N"
            )
        return self
