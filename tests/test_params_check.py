"""`dppa run`'s params check beside DVC's status (dppa/pipeline/params_check.py): the same verdict as checking in
this process (load_params), whether it runs in a forked child or here."""

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from dppa.cli.run import check_params
from dppa.errors import DppaError
from dppa.pipeline.config import load_params
from dppa.pipeline.params_check import ParamsCheck, on_overlap

ROOT = Path(__file__).resolve().parents[1]


def project(folder: Path, edit=None) -> Path:
    """The repository's params.yaml in `folder` (its zoo fine-tunes need no folder), edited by `edit`."""
    folder.mkdir(exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if edit:
        edit(params)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return folder


def in_this_process(folder: Path) -> str | None:
    """The message load_params gives, or None when the file passes."""
    try:
        load_params(folder / "params.yaml")
    except DppaError as error:
        return str(error)
    return None


# In a fresh interpreter (this one may have threads, and then nothing forks): the check as `dppa run` starts it.
FORKED = """\
import json, sys
from pathlib import Path
from dppa.cli.run import check_params
from dppa.errors import DppaError
from dppa.pipeline.params_check import ParamsCheck
checking = ParamsCheck(Path(sys.argv[1]), check_params)
assert checking._child is not None, "the check did not fork"
try:
    print(json.dumps({"follows": checking.result()}))
except DppaError as error:
    print(json.dumps({"error": str(error)}))
"""


class Forked:
    """ParamsCheck's outcome from a child of a fresh `dppa run`-like process."""

    def __init__(self, folder: Path):
        done = subprocess.run([sys.executable, "-c", FORKED, str(folder)], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        self.outcome = json.loads(done.stdout)

    def result(self) -> bool:
        if "error" in self.outcome:
            raise DppaError(self.outcome["error"])
        return self.outcome["follows"]


@pytest.fixture(params=["forked", "with a thread running"])
def started(request):
    """The check forked (in a fresh process), or here while another thread runs (no fork then)."""
    if request.param == "forked":
        yield Forked
        return

    def here(folder: Path) -> ParamsCheck:
        checking = ParamsCheck(folder, check_params)
        assert checking._child is None, "a process with threads must not fork"
        return checking

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        yield here
    finally:
        stop.set()
        thread.join()


def test_a_good_params_file_passes_and_zoo_models_follow_no_hub_branch(tmp_path, started):
    folder = project(tmp_path)
    assert in_this_process(folder) is None
    assert started(folder).result() is False


def test_a_model_at_a_hub_branch_is_reported(tmp_path, started):
    def at_branch(params):
        params["models"]["finetunes"]["arith"]["source"] = "org/arith-model"
        params["models"]["finetunes"]["arith"]["revision"] = "main"

    folder = project(tmp_path, at_branch)
    assert in_this_process(folder) is None
    assert started(folder).result() is True


@pytest.mark.parametrize(
    "edit",
    [
        lambda p: p["merge"].update(sclae=0.5),
        lambda p: p["prune"].update(density=1.5),
        lambda p: p["runtime"].update(on_overlap="sometimes"),
    ],
    ids=["unknown key", "bad density", "bad on_overlap"],
)
def test_a_bad_params_file_fails_with_the_message_of_the_check_in_this_process(tmp_path, started, edit):
    folder = project(tmp_path, edit)
    expected = in_this_process(folder)
    assert expected  # the edit is a mistake
    checking = started(folder)
    with pytest.raises(DppaError) as info:
        checking.result()
    assert str(info.value) == expected


def test_an_unasked_check_is_ended(tmp_path):
    checking = ParamsCheck(project(tmp_path), check_params)
    checking.cancel()  # (the run ended first): the child is killed and reaped, twice is harmless
    checking.cancel()


def test_the_lock_takes_on_overlap_unchecked_and_fail_when_it_is_not_a_choice(tmp_path):
    assert on_overlap(project(tmp_path / "a", lambda p: p["runtime"].update(on_overlap="wait"))) == "wait"
    assert on_overlap(project(tmp_path / "b", lambda p: p["runtime"].update(on_overlap="sometimes"))) == "fail"
    assert on_overlap(project(tmp_path / "c", lambda p: p["runtime"].pop("on_overlap", None))) == "fail"
    broken = tmp_path / "d"
    shutil.copytree(project(tmp_path / "c"), broken)
    (broken / "params.yaml").write_text("runtime: [unclosed\n")
    assert on_overlap(broken) == "fail"
