"""The warm start of `dppa run`'s stages (dppa/pipeline/stage_server.py): a `dppa stage` command handed to the
server behaves as the command itself would, in output, exit status and environment."""

import os
import subprocess
import sys
import time

from dppa.pipeline.stage_server import SERVER_ENV, run_through_server, warm_stages


def wait_listening(path: str, timeout_s: float = 120) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(path)
                return
            except OSError:
                time.sleep(0.2)
    raise AssertionError("the stage server did not listen")


def test_a_stage_command_runs_in_the_server_with_its_output_and_status(tmp_path, capfd):
    with warm_stages():
        path = os.environ[SERVER_ENV]
        wait_listening(path)
        # called from here, the stage runs only in the server's child: this process never parses it
        assert run_through_server(["stage", "prune", "--help"]) == 0
        assert "usage: dppa stage prune" in capfd.readouterr().out
        missing = tmp_path / "params.yaml"
        status = run_through_server(["stage", "prune", "--model", "m", "--delta", "d", "--out", "o", "--params",
                                     str(missing)])  # fmt: skip
        assert status == 2
        assert f"dppa stage: error: {missing}: no such params file" in capfd.readouterr().err
        # a command started under the block finds the server in its environment, and gets the same answers
        done = subprocess.run(
            [sys.executable, "-m", "dppa", "stage", "fetch", "--model", "m", "--zoo", "z", "--out", "o", "--params",
             str(missing)], capture_output=True, text=True, cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 2 and f"{missing}: no such params file" in done.stderr
    assert SERVER_ENV not in os.environ and not os.path.exists(path)


def test_without_a_server_the_command_runs_the_stage_itself(tmp_path, monkeypatch):
    monkeypatch.setenv(SERVER_ENV, str(tmp_path / "no-such-socket"))
    assert run_through_server(["stage", "prune", "--help"]) is None
    done = subprocess.run(
        [sys.executable, "-m", "dppa", "stage", "prune", "--help"], capture_output=True, text=True,
        env={**os.environ, SERVER_ENV: str(tmp_path / "no-such-socket")},
    )  # fmt: skip
    assert done.returncode == 0 and "usage: dppa stage prune" in done.stdout
