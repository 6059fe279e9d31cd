"""The project run lock, held by real processes: fail / skip / wait, and a killed holder taken over."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from dppa.errors import DppaError
from dppa.pipeline.run_lock import TOKEN_ENV, RunSkipped, read_holder, run_lock

HOLDER = textwrap.dedent("""
    import sys, time
    from dppa.pipeline.run_lock import run_lock
    with run_lock(sys.argv[1], command="holder"):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def start_holder(root, seconds):
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root), str(seconds)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def no_token(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)


def test_fail_and_skip_name_the_other_run(tmp_path, no_token):
    holder = start_holder(tmp_path, 60)
    try:
        with pytest.raises(DppaError, match=rf"holder \(pid {holder.pid} on .*\) is running on this project"):
            with run_lock(tmp_path, on_overlap="fail"):
                pass
        with pytest.raises(RunSkipped, match=str(holder.pid)):
            with run_lock(tmp_path, on_overlap="skip"):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_wait_takes_the_lock_once_the_holder_ends(tmp_path, no_token):
    holder = start_holder(tmp_path, 1)
    messages = []
    with run_lock(tmp_path, on_overlap="wait", poll_s=0.1, log=messages.append, command="second"):
        assert read_holder(tmp_path)["command"] == "second"  # the holder's record went with its lock
    assert holder.wait(timeout=30) == 0
    assert messages and messages[0].startswith("waiting for holder")
    assert read_holder(tmp_path) is None  # the record goes with the lock


def test_a_killed_holder_is_taken_over(tmp_path, no_token):
    holder = start_holder(tmp_path, 60)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    messages = []
    with run_lock(tmp_path, on_overlap="fail", log=messages.append):
        pass
    assert any("taking over the run lock from holder" in m for m in messages)


def test_stages_inside_a_run_do_not_wait_for_it(tmp_path, no_token):
    with run_lock(tmp_path):
        assert os.environ.get(TOKEN_ENV)
        with run_lock(tmp_path, on_overlap="fail"):  # as `dppa stage` under `dppa run` would
            pass
    assert TOKEN_ENV not in os.environ


def test_unknown_overlap_policy_is_refused(tmp_path, no_token):
    with pytest.raises(DppaError, match="runtime.on_overlap 'sometimes'"):
        with run_lock(tmp_path, on_overlap="sometimes"):
            pass
