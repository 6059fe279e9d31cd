"""Warm stages (dppa/pipeline/stage_server.py): a `dppa stage` command handed to a server behaves as the command
itself would, in output, exit status and environment; `dppa run` starts one for its stages, and under plain `dvc
repro` the first stage starts one that serves the later stages and ends with the DVC process."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from dppa import __version__
from dppa.pipeline.dvc_process import stage_environment
from dppa.pipeline.stage_client import (
    DECLINED,
    SERVER_ENV,
    WARM_ENV,
    receive_request,
    run_dvc_through_server,
    run_through_server,
    socket_folder,
    stage_command,
)
from dppa.pipeline.stage_server import source_files, warm_stages
from tests.helpers.pipeline import _cmdline


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
        assert run_through_server(["stage", "prune", "--help"], path) == 0
        assert "usage: dppa stage prune" in capfd.readouterr().out
        missing = tmp_path / "params.yaml"
        status = run_through_server(["stage", "prune", "--model", "m", "--delta", "d", "--out", "o", "--params",
                                     str(missing)], path)  # fmt: skip
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
    assert run_through_server(["stage", "prune", "--help"], os.environ[SERVER_ENV]) is None
    assert stage_command(["stage", "prune", "--help"]) is None  # a server named but gone: cold, none started
    done = subprocess.run(
        [sys.executable, "-m", "dppa", "stage", "prune", "--help"], capture_output=True, text=True,
        env={**os.environ, SERVER_ENV: str(tmp_path / "no-such-socket")},
    )  # fmt: skip
    assert done.returncode == 0 and "usage: dppa stage prune" in done.stdout


@pytest.fixture
def short_tmp(monkeypatch):
    """A short TMPDIR (a socket's path must fit in 107 bytes; pytest's folders are long), for this process too."""
    folder = tempfile.mkdtemp(prefix="ss-", dir="/tmp")
    monkeypatch.setenv("TMPDIR", folder)
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() caches its answer
    yield Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


def serving(folder: Path) -> list[str]:
    """Processes of a stage server whose socket is under `folder`, from /proc."""
    commands = (_cmdline(int(entry.name)) for entry in Path("/proc").glob("[0-9]*"))
    return [c for c in commands if "dppa.pipeline.stage_server" in c and str(folder) in c]


def wait_for(condition, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


# What `dppa stage` does first, made visible: the status of a command run in a warm server, or None (cold).
PROBE = """\
from dppa.pipeline.stage_client import stage_command
print(stage_command(["--version"]), flush=True)
"""
# Until the server that the first stage started listens (it imports torch and the stages first).
WAIT = """\
import os, socket, tempfile, time
from pathlib import Path
folder = Path(tempfile.gettempdir()) / f"dppa-stages-{os.getuid()}"
deadline = time.monotonic() + 120
while os.environ.get("DPPA_WARM_STAGES") != "0" and time.monotonic() < deadline:
    for path in folder.glob("dvc-*.sock"):
        with socket.socket(socket.AF_UNIX) as probe:
            if probe.connect_ex(str(path)) == 0:
                deadline = 0
    time.sleep(0.1)
Path("waited.txt").write_text(" ".join(sorted(p.name for p in folder.glob("dvc-*.sock"))))
"""
STAGES = """\
stages:
  first:
    cmd: python probe.py > first.txt
    deps: [probe.py]
    outs: [first.txt]
  wait:
    cmd: python wait.py
    deps: [first.txt, wait.py]
    outs: [waited.txt]
  third:
    cmd: python probe.py > third.txt
    deps: [waited.txt]
    outs: [third.txt]
"""


def dvc_project(folder: Path) -> Path:
    folder.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=folder, check=True)
    for name, text in {"probe.py": PROBE, "wait.py": WAIT, "dvc.yaml": STAGES}.items():
        (folder / name).write_text(text)
    return folder


def test_a_run_hands_its_dvc_commands_to_the_server_and_their_stages_come_back_to_it(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=project, check=True)
    (project / "probe.py").write_text(PROBE)
    (project / "dvc.yaml").write_text("stages:\n  probe:\n    cmd: python probe.py > out.txt\n    outs: [out.txt]\n")
    with warm_stages(dvc=True):
        path = os.environ[SERVER_ENV]
        wait_listening(path)
        env = {**stage_environment(), WARM_ENV: "0"}  # as tasks/dvc.py gives it
        lines: list[str] = []
        assert run_dvc_through_server(["repro"], path, project, env, lines.append) == 0
        assert "Running stage 'probe'" in "".join(lines)
        # DVC ran in the server's child (nothing else answers that call), and its stage reached the server too
        assert (project / "out.txt").read_text() == f"dppa {__version__}\n0\n"
        lines.clear()
        cold = subprocess.run([sys.executable, "-m", "dvc", "repro", "no-such-stage"], cwd=project, env=env,
                              capture_output=True, text=True)  # fmt: skip
        assert run_dvc_through_server(["repro", "no-such-stage"], path, project, env, lines.append) == cold.returncode
        assert cold.returncode != 0 and "".join(lines) == cold.stdout + cold.stderr  # DVC's error, through the pipe
    assert run_dvc_through_server(["repro"], path, project, env, lines.append) is None  # no server: the caller's turn


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "DPPA_WARM_STAGES=0"])
def test_under_plain_dvc_repro_the_first_stage_starts_a_server_that_serves_the_later_ones(tmp_path, short_tmp, warm):
    project = dvc_project(tmp_path / "project")
    env = {**stage_environment(), "TMPDIR": str(short_tmp)}
    env.pop(SERVER_ENV, None)
    if not warm:
        env[WARM_ENV] = "0"
    done = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (project / "first.txt").read_text() == "None\n"  # the first stage starts cold
    if warm:
        # the third reached the server: `dppa --version` ran in its child, on this stage's stdout, with status 0
        assert (project / "third.txt").read_text() == f"dppa {__version__}\n0\n"
        assert (project / "waited.txt").read_text().startswith("dvc-")
    else:
        assert (project / "third.txt").read_text() == "None\n"
        assert (project / "waited.txt").read_text() == ""
    # the server ends with the DVC process and removes its socket and lock
    folder = short_tmp / f"dppa-stages-{os.getuid()}"
    wait_for(lambda: not serving(short_tmp), f"a stage server outlived `dvc repro`: {serving(short_tmp)}")
    assert not folder.exists() or not list(folder.glob("*"))


def test_a_server_for_a_dvc_process_ends_with_it_and_a_second_one_for_the_same_socket_stands_down(short_tmp):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    path = str(socket_folder() / f"dvc-{sleeper.pid}-0.sock")
    command = [sys.executable, "-m", "dppa.pipeline.stage_server", path, "--watch", str(sleeper.pid)]
    server = subprocess.Popen(command)
    try:
        wait_listening(path)
        second = subprocess.run(command, timeout=120)  # the lock is held: it returns at once, touching nothing
        assert second.returncode == 0 and os.path.exists(path)
        assert run_through_server(["--version"], path) == 0
        sleeper.kill()
        sleeper.wait()
        server.wait(timeout=30)  # it watched the process's pidfd
        assert not os.path.exists(path) and not os.path.exists(f"{path}.lock")
    finally:
        for process in (sleeper, server):
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()


def test_a_socket_folder_that_others_can_open_is_refused(short_tmp):
    folder = short_tmp / f"dppa-stages-{os.getuid()}"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    with pytest.raises(PermissionError, match="not private to this user"):
        socket_folder()


def test_a_stage_started_by_hand_starts_no_server(short_tmp, monkeypatch):
    monkeypatch.delenv(SERVER_ENV, raising=False)
    monkeypatch.delenv(WARM_ENV, raising=False)
    assert stage_command(["--version"]) is None  # pytest is no DVC process
    assert not serving(short_tmp)


def test_the_servers_code_fingerprint_sees_an_edit_of_an_imported_project_module(tmp_path, monkeypatch):
    import types

    module_file = tmp_path / "probe_module.py"
    module_file.write_text("X = 1\n")
    module = types.ModuleType("dppa.probe_module")
    module.__file__ = str(module_file)
    monkeypatch.setitem(sys.modules, "dppa.probe_module", module)
    before = source_files()
    assert before[str(module_file)][1] == len("X = 1\n")
    assert source_files() == before
    module_file.write_text("X = 22\n")  # an edit (size and time) of a module the server imported
    assert source_files() != before


def test_a_declined_request_makes_the_command_run_the_stage_itself(short_tmp):
    import socket
    import struct

    path = str(short_tmp / "declining.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def decline() -> None:
        conn, _ = listener.accept()
        with conn:
            _request, fds = receive_request(conn)  # the whole request, as a server takes it
            for fd in fds:
                os.close(fd)
            conn.sendall(struct.pack("!i", DECLINED))

    server = threading.Thread(target=decline)
    server.start()
    try:
        assert run_through_server(["--version"], path) is None
    finally:
        server.join(timeout=30)
        listener.close()
