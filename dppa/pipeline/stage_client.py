"""The client side of warm stages (dppa/pipeline/stage_server.py, which says how they work): what a `dppa stage`
command and a run's `dvc repro` tasks call to hand themselves to a stage server, the request protocol, and finding
(or starting) the server for the DVC process a stage runs under. Light to import: a stage command imports this
before it knows whether it will run the stage itself.
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

SERVER_ENV = "DPPA_STAGE_SERVER"
WARM_ENV = "DPPA_WARM_STAGES"
STDIO = 3  # stdin, stdout, stderr
STATUS = struct.Struct("!i")
LENGTH = struct.Struct("!I")
DECLINED = -(2**31)  # the status a server sends for a request it will not run: the command then runs the stage itself
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


def send_request(conn: socket.socket, request: dict, stdio: tuple[int, int, int] = (0, 1, 2)) -> None:
    body = json.dumps(request).encode()
    fds = array.array("i", stdio)
    conn.sendmsg([LENGTH.pack(len(body))], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    conn.sendall(body)


def receive_request(conn: socket.socket) -> tuple[dict, list[int]]:
    fds = array.array("i")
    head, ancillary, _flags, _address = conn.recvmsg(LENGTH.size, socket.CMSG_LEN(STDIO * fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    try:
        (length,) = LENGTH.unpack(head)
        body = b""
        while len(body) < length:
            chunk = conn.recv(length - len(body))
            if not chunk:
                raise ConnectionError("the stage command went away")
            body += chunk
        request = json.loads(body)
        if request.get("program") not in ("dppa", "dvc"):
            raise ValueError(f"not a program this server runs: {request.get('program')!r}")
    except Exception:
        for fd in fds:
            os.close(fd)
        raise
    return request, list(fds)


def _connect(path: str) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        return None
    return conn


def _receive_status(conn: socket.socket) -> int | None:
    """The served command's exit status; None when the server declined the request (nothing ran)."""
    status = b""
    while len(status) < STATUS.size:
        chunk = conn.recv(STATUS.size - len(status))
        if not chunk:  # the child died without a status: killed
            print("dppa: the served command's process ended without an exit status (killed?)", file=sys.stderr)
            return 1
        status += chunk
    (code,) = STATUS.unpack(status)
    return None if code == DECLINED else code


def run_through_server(argv: list[str], path: str) -> int | None:
    """The stage's exit status, run by the server listening at `path` on this process's stdin, stdout and stderr;
    None when there is none to reach, or it declined (the caller then runs the stage itself)."""
    conn = _connect(path)
    if conn is None:
        return None
    with conn:
        try:
            send_request(conn, {"program": "dppa", "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)})
        except OSError:  # the server went away before it took the request: nothing ran
            return None
        return _receive_status(conn)


def run_dvc_through_server(
    argv: list[str], path: str, cwd: Path, env: dict[str, str], on_line: Callable[[str], None]
) -> int | None:
    """`dvc ARGV` run by the server listening at `path` (one that warmed DVC's imports: `warm_stages(dvc=True)`),
    in `cwd` with `env`; each line of its stdout and stderr is handed to `on_line` as it comes. Its exit status, or
    None when there is no server to reach or it declined (nothing ran: the caller then starts DVC itself)."""
    conn = _connect(path)
    if conn is None:
        return None
    with conn:
        read, write = os.pipe()
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            send_request(conn, {"program": "dvc", "argv": argv, "cwd": str(cwd), "env": env}, (null, write, write))
        except OSError:
            os.close(read)
            return None
        finally:  # the child holds its own copies: the pipe ends when it and what it started are done
            os.close(write)
            os.close(null)
        with open(read, errors="replace") as output:
            for line in output:
                on_line(line)
        return _receive_status(conn)


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
    lock = claim_socket(path)
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


def claim_socket(path: str) -> int | None:
    """The server's lock for a socket path (a descriptor, held while it serves), or None when another holds it."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd
