"""Prefect flows: the whole pipeline (`flows.pipeline`), one task per dvc.yaml stage; the only place Prefect runs."""

import os

# Set before Prefect reads its settings. No telemetry from an offline machine; and a generous start-up time for
# the embedded API server, which on a busy 2-core machine can take longer than Prefect's default 20 s.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
