"""Prefect tasks of the pipeline flow: one per dvc.yaml stage (`tasks.dvc.repro_stage`), run through DVC.

A model-heavy stage's task carries the `dppa-gpu` tag, whose Prefect concurrency limit (runtime.gpu_concurrency)
caps how many of them run at once.
"""

GPU_TAG = "dppa-gpu"
