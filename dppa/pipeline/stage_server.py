"""A warm start for the stages of one `dppa run`: a process that has imported torch and the stages once, and forks
a copy of itself for each `dppa stage` command that DVC starts, so a stage does not pay the imports again (about
2 s of torch and its friends on a 2-core machine, most of a light stage's cost).

`dppa run` starts the server (`python -m dppa.pipeline.stage_server SOCKET`, bound to `dppa run` by a lifeline)
and puts its socket's path in the environment (SERVER_ENV) of the `dvc repro` processes it starts. A `dppa stage`
command that finds SERVER_ENV connects, and sends its arguments, working folder and environment, with its own
stdin, stdout and stderr (as file descriptors, SCM_RIGHTS); the server forks; the child takes those over and runs
the stage as the command would have, then sends back its exit status. The command waits for it, so to DVC it is the
stage's process: same output, same exit status. If the command is killed (DVC is killed), the child sees its
connection close and ends too; if the server is gone, the command runs the stage itself.

The server stays single-threaded (forking a process with threads is unsafe) and never runs a stage itself.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import sys
import threading
from collections.abc import Iterator

SERVER_ENV = "DPPA_STAGE_SERVER"
STDIO = 3  # stdin, stdout, stderr
STATUS = struct.Struct("!i")
LENGTH = struct.Struct("!I")


def _send_request(conn: socket.socket, argv: list[str]) -> None:
    body = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    fds = array.array("i", range(STDIO))
    conn.sendmsg([LENGTH.pack(len(body))], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    conn.sendall(body)


def _receive_request(conn: socket.socket) -> tuple[dict, list[int]]:
    fds = array.array("i")
    head, ancillary, _flags, _address = conn.recvmsg(LENGTH.size, socket.CMSG_LEN(STDIO * fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    (length,) = LENGTH.unpack(head)
    body = b""
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        if not chunk:
            raise ConnectionError("the stage command went away")
        body += chunk
    return json.loads(body), list(fds)


def run_through_server(argv: list[str]) -> int | None:
    """The stage's exit status, run by the server named in SERVER_ENV; None when there is none to reach (the
    caller then runs the stage itself)."""
    path = os.environ.get(SERVER_ENV)
    if not path:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        return None
    with conn:
        try:
            _send_request(conn, argv)
        except OSError:  # the server went away before it took the request: nothing ran
            return None
        status = b""
        while len(status) < STATUS.size:
            chunk = conn.recv(STATUS.size - len(status))
            if not chunk:  # the child died without a status: killed
                print("dppa stage: the stage's process ended without an exit status (killed?)", file=sys.stderr)
                return 1
            status += chunk
    return STATUS.unpack(status)[0]


def _end_when_the_command_goes(conn: socket.socket) -> None:
    """In the child: the command (and so DVC) is gone when its connection closes; then end as if signalled."""

    def watch() -> None:
        try:
            conn.recv(1)
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="dppa-stage-command-watch").start()


def _run_child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked child: become the stage command, run it, send its status, exit."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin, sys.stdout, sys.stderr = (
        open(0, closefd=False), open(1, "w", closefd=False), open(2, "w", closefd=False)
    )  # fmt: skip
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.pop(SERVER_ENV, None)  # the child runs the stage itself
    _end_when_the_command_goes(conn)
    code = 1
    try:
        from dppa.cli import main

        code = main(request["argv"])
    except SystemExit as exit_:  # argparse's --help and usage errors
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            conn.sendall(STATUS.pack(code))
        finally:
            os._exit(code)


@contextlib.contextmanager
def warm_stages() -> Iterator[None]:
    """A stage server for the block, its socket in SERVER_ENV (inherited by the processes started in the block).
    Nothing waits for it: a stage that comes before it listens (or after it failed) starts cold, as under plain
    `dvc repro`."""
    import tempfile

    from dppa.pipeline import lifeline

    if os.environ.get(SERVER_ENV) or not hasattr(socket, "AF_UNIX"):
        yield
        return
    folder = tempfile.mkdtemp(prefix="dppa-stages-")
    path = os.path.join(folder, "socket")
    server = lifeline.popen([sys.executable, "-m", "dppa.pipeline.stage_server", path])
    os.environ[SERVER_ENV] = path
    try:
        yield
    finally:
        os.environ.pop(SERVER_ENV, None)
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


def warm_up() -> None:
    """What every stage imports, imported once here (the children inherit it)."""
    import dppa.cli  # noqa: F401
    import dppa.cli.stage  # noqa: F401
    import dppa.stages  # noqa: F401  (torch, safetensors, the engine, the params schema)


def serve(path: str) -> None:
    warm_up()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    while True:
        conn, _ = listener.accept()
        try:
            request, fds = _receive_request(conn)
        except Exception:  # a client that went away, or was not one (a probe): the server goes on
            conn.close()
            continue
        if os.fork() == 0:
            listener.close()
            _run_child(conn, request, fds)
        conn.close()
        for fd in fds:
            os.close(fd)


if __name__ == "__main__":
    serve(sys.argv[1])
