"""Warm stages: a process that has imported torch and the stages once, and forks a copy of itself for each `dppa
stage` command that DVC starts, so a stage does not pay the imports again (about 2 s of torch and its friends on a
2-core machine, most of a light stage's cost).

Two ways a server comes to be, one protocol:
- `dppa run` starts one for the run (`warm_stages`, bound to `dppa run` by a lifeline) and puts its socket's path in
  the environment (SERVER_ENV) of the `dvc repro` processes it starts.
- Under plain `dvc repro` / `dvc exp run` (no SERVER_ENV), the first `dppa stage` finds the DVC process among its
  ancestors, starts a server for it in the background and runs itself cold; the later stages of that DVC process
  find the server by DVC's pid and start time. The server ends when that DVC process ends (it waits on a pidfd),
  so nothing outlives the DVC command. DPPA_WARM_STAGES=0 turns this off (every stage then starts cold).
A `dppa stage` command that reaches a server sends its arguments, working folder and environment, with its own
stdin, stdout and stderr (as file descriptors, SCM_RIGHTS); the server forks; the child takes those over and runs
the stage as the command would have, then sends back its exit status. The command waits for it, so to DVC it is the
stage's process: same output, same exit status. If the command is killed (DVC is killed, Ctrl-C), the child sees
its connection close and ends too; if there is no server to reach, the command runs the stage itself.

The server stays single-threaded (forking a process with threads is unsafe) and never runs a stage itself. Its
socket lives in a folder only this user can open (a request names the environment a stage runs with).
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

SERVER_ENV = "DPPA_STAGE_SERVER"
WARM_ENV = "DPPA_WARM_STAGES"
STDIO = 3  # stdin, stdout, stderr
STATUS = struct.Struct("!i")
LENGTH = struct.Struct("!I")
DECLINED = -(2**31)  # the status a server sends for a request it will not run: the command then runs the stage itself
PROJECT_PACKAGES = ("dppa", "flows", "tasks")  # whose source files a server checks before each stage
MAX_SOCKET_PATH = 100  # bytes; AF_UNIX paths are limited to 104-108 by the platform
DVC_ANCESTOR_LEVELS = 4  # DVC -> (its shell) -> `dppa stage`, with room for a wrapper


def socket_folder() -> Path:
    """This user's folder for stage servers' sockets, private to the user (created when missing)."""
    folder = Path(tempfile.gettempdir()) / f"dppa-stages-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{folder} is not private to this user: remove it (dppa recreates it)")
    return folder


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


def run_through_server(argv: list[str], path: str) -> int | None:
    """The stage's exit status, run by the server listening at `path`; None when there is none to reach (the caller
    then runs the stage itself)."""
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
    (code,) = STATUS.unpack(status)
    return None if code == DECLINED else code


def _process(pid: int) -> tuple[list[str], int, str]:
    """(command line, parent pid, start time) of a process, from /proc."""
    command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
    return command, int(fields[1]), fields[19]  # fields 4 (ppid) and 22 (start time) of proc(5)


def _dvc_ancestor() -> tuple[int, str] | None:
    """(pid, start time) of the DVC process that started this one (`dvc ...`, `python -m dvc ...`), if any."""
    pid = os.getppid()
    for _ in range(DVC_ANCESTOR_LEVELS):
        if pid <= 1:
            return None
        try:
            command, parent, started = _process(pid)
        except (OSError, IndexError, ValueError):
            return None
        if "dvc" in (os.path.basename(word) for word in command[:3]):
            return pid, started
        pid = parent
    return None


def _dvc_server() -> tuple[str, int] | None:
    """(socket path, DVC's pid) of the warm server for the DVC process above this one; None when there is no such
    process, the platform lacks what it needs (Linux /proc and pidfds), or DPPA_WARM_STAGES=0."""
    if os.environ.get(WARM_ENV, "1") == "0" or not hasattr(os, "pidfd_open") or not hasattr(socket, "AF_UNIX"):
        return None
    ancestor = _dvc_ancestor()
    if ancestor is None:
        return None
    pid, started = ancestor
    try:
        path = str(socket_folder() / f"dvc-{pid}-{started}.sock")
    except OSError:
        return None
    return (path, pid) if len(os.fsencode(path)) <= MAX_SOCKET_PATH else None


def _start_dvc_server(path: str, dvc_pid: int) -> None:
    """Start the server for a DVC process in the background, unless one holds its lock (it is starting)."""
    lock = _claim(path)
    if lock is None:
        return
    os.close(lock)  # the server takes it again; two that race here settle it there
    subprocess.Popen(
        [sys.executable, "-m", "dppa.pipeline.stage_server", path, "--watch", str(dvc_pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # not the terminal's process group: it ends with DVC, not with a Ctrl-C to a stage
    )


def stage_command(argv: list[str]) -> int | None:
    """Run a `dppa stage` command line in a warm server when one is there to reach: the exit status, or None when
    the caller must run the stage itself (then, under plain DVC, a server is started for the stages after it)."""
    path = os.environ.get(SERVER_ENV)
    if path:  # under `dppa run`: its server, or cold when it is gone
        return run_through_server(argv, path)
    under_dvc = _dvc_server()
    if under_dvc is None:
        return None
    status = run_through_server(argv, under_dvc[0])
    if status is None:
        _start_dvc_server(*under_dvc)
    return status


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
    os.environ[WARM_ENV] = "0"  # (and starts no server of its own)
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
    Nothing waits for it: a stage that comes before it listens (or after it failed) starts cold."""
    from dppa.pipeline import lifeline

    try:
        folder = None if os.environ.get(SERVER_ENV) or not hasattr(socket, "AF_UNIX") else socket_folder()
    except OSError as error:  # (a folder not private to this user): the stages start cold
        print(f"dppa: stages start cold: {error}", file=sys.stderr)
        folder = None
    # (a name of its own: one process may hold several, as the test suite does)
    path = str(folder / f"run-{os.getpid()}-{os.urandom(4).hex()}.sock") if folder is not None else ""
    if not path or len(os.fsencode(path)) > MAX_SOCKET_PATH:
        yield
        return
    server = lifeline.popen([sys.executable, "-m", "dppa.pipeline.stage_server", path])
    os.environ[SERVER_ENV] = path
    try:
        yield
    finally:
        os.environ.pop(SERVER_ENV, None)
        server.terminate()
        server.wait(timeout=30)


def warm_up() -> None:
    """What every stage imports, imported once here (the children inherit it)."""
    import dppa.cli  # noqa: F401
    import dppa.cli.stage  # noqa: F401
    import dppa.stages  # noqa: F401  (torch, safetensors, the engine, the params schema)


def source_files() -> dict[str, tuple[int, int]]:
    """{file: (mtime, size)} of the project's modules imported in this process (PROJECT_PACKAGES)."""
    files = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and name.split(".")[0] in PROJECT_PACKAGES:
            try:
                info = os.stat(path)
            except OSError:
                info = None
            files[path] = (info.st_mtime_ns, info.st_size) if info else (0, -1)
    return files


def _claim(path: str) -> int | None:
    """The server's lock for a socket path (a descriptor, held while it serves), or None when another holds it."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _stop(_signum, _frame) -> None:
    raise SystemExit(0)  # unwinds serve(), which removes its socket


def serve(path: str, watch: int | None = None) -> None:
    """Serve stages at `path` until SIGTERM, or until process `watch` (a DVC process) ends."""
    signal.signal(signal.SIGTERM, _stop)
    lock = _claim(path)
    if lock is None:  # another server has this path
        return
    ended = os.pidfd_open(watch) if watch is not None else None  # before the imports: DVC may end meanwhile
    try:
        warm_up()
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a socket left by a server that was killed (we hold its lock)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(64)
        _serve_until(listener, lock, ended)
    finally:
        for leftover in (path, f"{path}.lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


def _serve_until(listener: socket.socket, lock: int, ended: int | None) -> None:
    """Fork a child per request until the watched process's pidfd `ended` is readable (it ended), or until the
    project's code changes on disk: a stage must run the code DVC records for it, so a request that comes after an
    edit is declined (its command runs cold, reading the new code) and the server ends."""
    held = [lock] if ended is None else [lock, ended]  # what a child must not keep
    waited = [listener] if ended is None else [listener, ended]
    code = source_files()
    while True:
        ready, _, _ = select.select(waited, [], [])
        if ended in ready:
            return
        conn, _ = listener.accept()
        try:
            request, fds = _receive_request(conn)
        except Exception:  # a client that went away, or was not one (a probe): the server goes on
            conn.close()
            continue
        if source_files() != code:
            with contextlib.suppress(OSError):
                conn.sendall(STATUS.pack(DECLINED))
            conn.close()
            for fd in fds:
                os.close(fd)
            return
        if os.fork() == 0:
            try:  # the child never returns into serve(), which would remove the server's socket
                listener.close()
                for fd in held:
                    os.close(fd)
                _run_child(conn, request, fds)
            finally:
                os._exit(1)
        conn.close()
        for fd in fds:
            os.close(fd)


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[3]) if sys.argv[2:3] == ["--watch"] else None)
