"""The pipeline around the engine: params.yaml and its checks, DVC and Prefect plumbing, hub fetch, grid, publish."""
