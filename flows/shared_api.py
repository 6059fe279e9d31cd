"""One Prefect API for all the stages that one `dvc repro` (or `dvc exp run`) runs, instead of one per stage.

A stage run by DVC without PREFECT_API_URL (plain `dvc repro`, not `dppa run`) would make Prefect start a temporary
server for its own process: seconds per stage, most of a small stage's cost. Instead, the first stage starts a
keeper (`python -m dppa.flows.shared_api`) that starts one temporary server and keeps it for as long as the DVC process
that runs the stages is alive; the following stages find its address in .dvc/tmp and report to it. The keeper is a
watchdog (it polls the DVC process, and stops the server the moment DVC is gone, however DVC ended), and the server
is bound to the keeper by a parent-death signal (dppa/pipeline/lifeline.py), so nothing outlives the run.
Its events go to KEEPER_LOG beside the address file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SHELLS = {"sh", "bash", "dash", "zsh", "fish", "ksh"}
POLL_S = 0.5
KEEPER_LOG = "dppa-api.log"


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(command name, parent pid, start time in clock ticks) of a live process, from /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return (None if fields[0] == "Z" else name), int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def dvc_process() -> tuple[int, int] | None:
    """(pid, start time) of the DVC process that runs this stage, or None when DVC did not start this process.
    DVC sets DVC_STAGE for a stage's command and runs it through the user's shell, which may or may not exec it."""
    if not os.environ.get("DVC_STAGE") or not sys.platform.startswith("linux"):
        return None
    pid = os.getppid()
    while pid > 1 and (info := _stat(pid)) is not None:
        name, parent, started = info
        if name not in SHELLS:
            return (pid, started) if "dvc" in _cmdline(pid) else None
        pid = parent
    return None


def alive(pid: int, started: int) -> bool:
    info = _stat(pid)
    return info is not None and info[0] is not None and info[2] == started  # the same process, not a reused pid


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def shared_api_url(folder: Path, timeout_s: float = 180) -> str | None:
    """The address of the API kept for the DVC process running this stage, started now if there is none yet;
    None when this stage was not started by DVC (then Prefect's own per-process server is used)."""
    owner = dvc_process()
    if owner is None:
        return None
    pid, started = owner
    folder.mkdir(parents=True, exist_ok=True)
    address = folder / f"dppa-api-{pid}-{started}.json"
    with _locked(folder / "dppa-api.lock"):  # stages started side by side (dvc exp queues) start one keeper
        if address.exists():
            url = json.loads(address.read_text())["url"]
            if _healthy(url):
                return url
            address.unlink()
        import dppa

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(dppa.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
        env.pop("DVC_STAGE", None)
        with open(folder / KEEPER_LOG, "a") as log:
            keeper = subprocess.Popen(
                [sys.executable, "-m", "dppa.flows.shared_api", str(pid), str(started), str(address)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,  # not ended with this stage: it ends with DVC
            )
        deadline = time.monotonic() + timeout_s
        while not address.exists():
            if keeper.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the shared Prefect API did not start; see {folder / KEEPER_LOG}")
            time.sleep(0.1)
        return json.loads(address.read_text())["url"]


def _log(message: str) -> None:
    stamp = dt.datetime.now().isoformat(timespec="seconds")
    print(f"{stamp} keeper {os.getpid()}: {message}", file=sys.stderr, flush=True)


def keep(dvc_pid: int, dvc_started: int, address: Path) -> None:
    """Start a temporary Prefect server, publish its address, and stop it when the DVC process is gone."""
    # Run as `python -m dppa.flows.shared_api`: flows/__init__ (its environment defaults) ran before Prefect.
    from prefect.server.api.server import SubprocessASGIServer

    from dppa.io.atomic import atomic_write_text
    from dppa.pipeline.lifeline import children_die_with_us

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the server on the way out (finally below)
    server = SubprocessASGIServer()
    try:
        with children_die_with_us():  # the server ends with this keeper, even if the keeper is killed
            server.start(timeout=180)
        _log(f"serving {server.api_url} (server pid {server.server_process.pid}) for dvc pid {dvc_pid}")
        atomic_write_text(address, json.dumps({"url": server.api_url, "keeper": os.getpid()}) + "\n")
        while alive(dvc_pid, dvc_started):
            time.sleep(POLL_S)
        _log(f"dvc pid {dvc_pid} has ended: stopping the server")
    finally:
        with contextlib.suppress(OSError):
            address.unlink()
        server.stop()


if __name__ == "__main__":
    keep(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
