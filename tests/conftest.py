"""Shared fixtures. Tests run offline: no model or dataset hub is reachable."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The per-user zoo cache (dppa/zoo/cache.py) stays out of the tests: a zoo stage under test builds its zoo.
os.environ["DPPA_ZOO_CACHE"] = "off"
# DVC starts a usage-analytics daemon process after every command it runs, by default; the tests' throwaway projects
# run hundreds of DVC commands, offline.
os.environ["DVC_NO_ANALYTICS"] = "1"

import pytest  # noqa: E402

from tests.helpers.synthetic import make_base, make_finetune  # noqa: E402

# The files that run whole pipelines take most of `make test`'s time. pytest-xdist (`--dist loadfile
# --no-loadscope-reorder`, Makefile) hands out files in collection order, so these go first and the many short files
# fill in beside them; by default it orders files by their number of tests, which started these last and left one
# worker running them alone at the end (21 min wall for 33 CPU-minutes on 2 cores).
LONGEST_FIRST = (
    "test_pipeline.py",  # builds the tiny zoo and the shared project (tests/helpers/pipeline.py, built_once) ...
    "test_real_llm.py",  # ... while the other workers start on what needs neither
    "test_dask_resources.py",
    "test_hub_pipeline.py",
    "test_adapter_pipeline.py",
    "test_dvc_team.py",  # these copy the shared project
    "test_pipeline_runs.py",
    "test_pipeline_kills.py",
    "test_unattended.py",
    "test_init.py",
    "test_hub_fetch.py",
    "test_publish.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests keep their order


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A float32 tiny LLaMA base and two heavy-tailed fine-tunes of it."""
    root = tmp_path_factory.mktemp("tiny_models")
    base = make_base(root / "base")
    return base, make_finetune(base, root / "ft1", seed=1), make_finetune(base, root / "ft2", seed=2)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """The demo zoo at --size tiny (base + one fine-tune per domain), built once per test session and shared by the
    pytest-xdist workers (the first to ask builds it under a file lock; a minute of CPU each, otherwise). Nothing may
    change it."""
    import shutil

    from filelock import FileLock

    from dppa.zoo.build import build_zoo
    from tests.helpers.pipeline import session_folder

    shared = session_folder(tmp_path_factory)
    out, done = shared / "tiny-zoo" / "tiny", shared / "tiny-zoo" / "built"
    with FileLock(str(shared / "tiny-zoo.lock")):
        if not done.exists():
            shutil.rmtree(out.parent, ignore_errors=True)
            build_zoo(out, size="tiny", regime="heavy", seed=0, workers=2, log=lambda _msg: None)  # the parallel path
            done.touch()
    return out


@pytest.fixture(scope="session")
def stage_server():
    """The socket of a warm stage server (dppa/pipeline/stage_server.py, what `dppa run` starts beside its `dvc repro`)
    for this pytest worker: a `dppa stage` command whose environment names it forks the server instead of importing
    torch and the stages again (about 2 s a stage). Only for DVC runs whose subject is not the stage's own cold start
    and whose environment is the session's (the server imported its modules under it): a test passes it on
    explicitly (`dvc(..., server=stage_server)`), and nothing else sees it."""
    from dppa.pipeline.stage_client import SERVER_ENV
    from dppa.pipeline.stage_server import warm_stages

    with warm_stages():
        yield os.environ.pop(SERVER_ENV)


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """One embedded Prefect API for the module, shared by every stage process and Dask worker (started after it)
    through PREFECT_API_URL (as `dppa run` does), so that each does not start its own server."""
    saved = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_API_URL")}
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ.pop("PREFECT_API_URL", None)
    import dppa.flows  # noqa: F401  (its environment defaults)
    from dppa.flows.runtime import prefect_api as api

    with api() as url:
        yield url
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
