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

`dppa run`'s server also runs its `dvc repro --single-item STAGE` commands (run_dvc_through_server): a child forked
with DVC imported saves most of DVC's own start (0.7 of 1.2 s). Their output comes back on a pipe, and the stage
commands they start come back to the same server. The client side (what a command calls, the protocol, finding the
server of a DVC process) is dppa/pipeline/stage_client.py.

The server stays single-threaded (forking a process with threads is unsafe) and never runs a stage itself. Its
socket lives in a folder only this user can open (a request names the environment a stage runs with).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import threading
from collections.abc import Iterator

from dppa.pipeline.stage_client import (
    DECLINED,
    MAX_SOCKET_PATH,
    SERVER_ENV,
    STATUS,
    WARM_ENV,
    claim_socket,
    receive_request,
    socket_folder,
)

PROJECT_PACKAGES = ("dppa", "flows", "tasks")  # whose source files a server checks before each stage


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
    # Line-buffered, as the interpreter's own streams are under PYTHONUNBUFFERED: a long stage's log reaches DVC, the
    # run's log and the Prefect UI as it goes, not in blocks of 8 KB.
    sys.stdin, sys.stdout, sys.stderr = (
        open(0, closefd=False), open(1, "w", buffering=1, closefd=False), open(2, "w", buffering=1, closefd=False)
    )  # fmt: skip
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    dvc = request["program"] == "dvc"
    if not dvc:
        os.environ.pop(SERVER_ENV, None)  # the child runs the stage itself
        os.environ[WARM_ENV] = "0"  # (and starts no server of its own)
    # (a DVC child keeps SERVER_ENV: the stage commands it starts come back to this server)
    _end_when_the_command_goes(conn)
    code = 1
    try:
        if dvc:
            from dvc.cli import main
        else:
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
def warm_stages(dvc: bool = False) -> Iterator[None]:
    """A stage server for the block, its socket in SERVER_ENV (inherited by the processes started in the block).
    Nothing waits for it: a stage that comes before it listens (or after it failed) starts cold. `dvc`: it also
    imports DVC, for the `dvc repro` commands of a run (run_dvc_through_server)."""
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
    server = lifeline.popen([sys.executable, "-m", "dppa.pipeline.stage_server", path, *(["--dvc"] if dvc else [])])
    os.environ[SERVER_ENV] = path
    try:
        yield
    finally:
        os.environ.pop(SERVER_ENV, None)
        server.terminate()
        server.wait(timeout=30)


# What `dvc repro --single-item STAGE` imports as it goes (most of DVC's own cost for a stage: 0.7 of its 1.2 s)
DVC_MODULES = (
    "dvc.cli", "dvc.cli.parser", "dvc.repo", "dvc.repo.reproduce", "dvc.repo.status", "dvc.repo.index",
    "dvc.repo.stage", "dvc.repo.plots", "dvc.repo.metrics", "dvc.repo.params", "dvc.scm", "scmrepo.git",
    "dulwich.repo", "dulwich.client", "dvc.lock", "dvc.rwlock", "dvc.stage.cache", "dvc.stage.run", "dvc.cachemgr",
    "dvc.data_cloud", "dvc_data.index", "dvc_data.hashfile.state", "dvc.fs.dvc", "dvc.fs.git", "dvc.dependency.repo",
    "dvc.daemon", "dvc.ignore", "dvc.utils.strictyaml", "ruamel.yaml", "psutil", "flufl.lock", "dvc_render",
    "sqltrie", "diskcache", "platformdirs", "configobj",
)  # fmt: skip


def warm_up(dvc: bool = False) -> None:
    """What every stage imports (and with `dvc`, what DVC imports), imported once here (the children inherit it)."""
    import importlib

    import dppa.cli  # noqa: F401
    import dppa.cli.stage  # noqa: F401
    import dppa.stages  # noqa: F401  (torch, safetensors, the engine, the params schema)

    for module in DVC_MODULES if dvc else ():
        with contextlib.suppress(ImportError):  # another DVC version's layout: it imports the rest itself
            importlib.import_module(module)


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


def _stop(_signum, _frame) -> None:
    raise SystemExit(0)  # unwinds serve(), which removes its socket


def serve(path: str, watch: int | None = None, dvc: bool = False) -> None:
    """Serve stages at `path` until SIGTERM, or until process `watch` (a DVC process) ends; `dvc`: DVC's imports
    too (warm_up)."""
    signal.signal(signal.SIGTERM, _stop)
    lock = claim_socket(path)
    if lock is None:  # another server has this path
        return
    ended = os.pidfd_open(watch) if watch is not None else None  # before the imports: DVC may end meanwhile
    try:
        warm_up(dvc)
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
            request, fds = receive_request(conn)
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
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dppa.pipeline.stage_server")
    parser.add_argument("path", help="the socket to listen at")
    parser.add_argument("--watch", type=int, metavar="PID", help="end when this process (a DVC command) ends")
    parser.add_argument("--dvc", action="store_true", help="also import DVC, for `dvc repro` requests")
    args = parser.parse_args()
    serve(args.path, args.watch, args.dvc)
