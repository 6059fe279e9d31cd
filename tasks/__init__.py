"""Prefect tasks: thin wrappers that take artifact paths in and give artifact paths out.

The work itself is done by the engine (`dppa`); these add what orchestration needs: retries on network fetches and
the `dppa-gpu` tag, whose Prefect concurrency limit (runtime.gpu_concurrency) caps how many model-heavy steps run
at once, across every stage process that talks to the same Prefect API.
"""

GPU_TAG = "dppa-gpu"
