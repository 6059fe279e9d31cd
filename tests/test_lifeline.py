"""Children started with the lifeline end when their parent is killed with SIGKILL (real processes)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")

PARENT = textwrap.dedent("""
    import subprocess, sys, time
    from dppa.pipeline import lifeline
    if sys.argv[1] == "popen":
        child = lifeline.popen([sys.executable, "-c", "import time; time.sleep(120)"])
    else:
        with lifeline.children_die_with_us():
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        assert isinstance(child, subprocess.Popen)
    print(child.pid, flush=True)
    time.sleep(120)
""")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("how", ["popen", "patched"])
def test_child_ends_when_parent_is_killed(how):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, how], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    still = alive(child)
    if still:
        os.kill(child, signal.SIGKILL)
    assert not still, "the child outlived its killed parent"
