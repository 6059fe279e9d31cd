"""Runs of `dppa run` killed mid-stage (SIGKILL, SIGTERM, Ctrl-C) leave no process behind, and the next run
completes; each on its own copy of the session's built project (tests/helpers/pipeline.py's `built_once`). Apart
from tests/test_pipeline_runs.py so that pytest-xdist can run the two files side by side.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from dppa.pipeline.dvc_process import stage_environment
from dppa.pipeline.stage_client import SERVER_ENV
from tests.helpers.pipeline import _cmdline, alive, built_once, descendants, edit_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_zoo, prefect_api, stage_server):
    """(the session's built project, not to be changed, and its artifact contents)"""
    return built_once(tmp_path_factory, tiny_zoo, stage_server)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_run_killed_mid_stage_leaves_no_process_and_the_next_run_completes(
    built, tmp_path, sig, prefect_api, stage_server
):
    project = tmp_path / "project"
    shutil.copytree(built[0], project, symlinks=True)
    # a scale no other test used, so that DVC's run cache cannot restore the merge instead of running it
    edit_params(
        project,
        lambda p: p["merge"].update(
            scale={signal.SIGKILL: 0.91, signal.SIGTERM: 0.92, signal.SIGINT: 0.93}[sig], search=None
        ),
    )
    env = {k: v for k, v in stage_environment().items() if k != "PREFECT_API_URL"}  # its own temporary server
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    run = subprocess.Popen(
        [sys.executable, "-m", "dppa", "run", "-C", str(project)],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    for line in run.stdout:  # until the merge stage's own process runs
        if "Running stage 'merge'" in line:
            break
    deadline = time.monotonic() + 60
    while not any("stage" in _cmdline(p) and "merge" in _cmdline(p) for p in descendants(run.pid)):
        assert time.monotonic() < deadline and run.poll() is None, "the merge stage never started"
        time.sleep(0.05)
    started = descendants(run.pid)
    assert any("uvicorn" in _cmdline(p) for p in started)  # the temporary Prefect server is among them
    run.send_signal(sig)
    run.wait(timeout=60)
    run.stdout.close()
    deadline = time.monotonic() + 30
    while any(alive(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {p: _cmdline(p) for p in started if alive(p)}
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"left behind after {sig.name}: {left}"
    # the next run: against the module's Prefect API and warm stage server, whose start-ups are not under test here
    env.update({"PREFECT_API_URL": prefect_api, SERVER_ENV: stage_server})
    again = subprocess.run(
        [sys.executable, "-m", "dppa", "run", "-C", str(project)], env=env, text=True, capture_output=True
    )
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "merge" in again.stdout
