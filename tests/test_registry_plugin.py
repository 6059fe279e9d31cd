"""A pruning method added from outside the package: one file (tests/plugins/toy_pruner.py), registered on import,
shows up in `dppa prune --help` and runs through `dppa prune`."""

import importlib
import json
import re
import sys

import pytest
import torch

from dppa.cli import main
from dppa.io.reader import open_checkpoint
from dppa.sparsify.registry import PRUNERS
from tests.helpers.toy_delta import SCOPE, TOY, write_delta

PLUGIN = "tests.plugins.toy_pruner"


@pytest.fixture
def toy_plugin():
    # Import (registering it) for this test only, so that other tests see the built-in methods alone.
    was_loaded = PLUGIN in sys.modules
    module = importlib.import_module(PLUGIN)
    yield module
    if not was_loaded:
        PRUNERS.unregister("toy_top1")
        sys.modules.pop(PLUGIN)


def prune_help(capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_the_plugin_shows_up_in_prune_help(toy_plugin, capsys):
    assert "toy_top1" in PRUNERS.names()
    text = prune_help(capsys)
    assert "{magnitude,dare,dp,toy_top1}" in text  # --method choices
    assert re.search(r"\n  toy_top1 +keep the largest \|delta\| of each tensor", text)  # the method list
    assert "--toy-power TOY_POWER" in text and "(default 1.0)" in text  # its option, typed, with its default


def test_help_without_the_plugin_has_the_built_in_methods_only(capsys):
    if PLUGIN in sys.modules:
        pytest.skip("another test keeps the toy plugin loaded")
    text = prune_help(capsys)
    assert "{magnitude,dare,dp}" in text and "toy" not in text


def test_prune_with_the_plugin_keeps_the_largest_entry_times_power(toy_plugin, tmp_path, capsys):
    delta = write_delta(tmp_path / "toy", TOY)
    out = tmp_path / "pruned"
    assert (
        main(
            [
                "prune",
                str(delta),
                "-o",
                str(out),
                "--method",
                "toy_top1",
                "--density",
                "0.5",
                "--toy-power",
                "2",
                "--scope",
                SCOPE,
                "-q",
            ]
        )
        == 0
    )
    reader = open_checkpoint(out)
    # by hand: the largest |delta| of each in-scope tensor (first one on ties), signs alternate +, -, +, ...
    expected_top = {
        "layers.0.a.weight": (9, -10.0),
        "layers.0.b.weight": (0, 1.0),
        "layers.1.a.weight": (8, 12.0),
        "layers.1.b.weight": (9, -30.0),
    }
    for name, (index, value) in expected_top.items():
        expected = torch.zeros(TOY[name].numel())
        expected[index] = 2 * value
        assert torch.equal(reader.get(name).view(-1), expected), name
    assert torch.equal(reader.get("norm.weight"), TOY["norm.weight"])  # out of scope: untouched
    manifest = json.loads((out / "dppa_manifest.json").read_text())
    assert (manifest["method"], manifest["toy_power"], manifest["kept_per_tensor"]) == ("toy_top1", 2.0, 1)


def test_an_option_of_another_method_is_refused(toy_plugin, tmp_path, capsys):
    delta = write_delta(tmp_path / "toy", TOY)
    capsys.readouterr()
    code = main(
        [
            "prune",
            str(delta),
            "-o",
            str(tmp_path / "out"),
            "--method",
            "dp",
            "--density",
            "0.5",
            "--toy-power",
            "2",
            "--scope",
            SCOPE,
            "-q",
        ]
    )
    assert code == 2
    assert "--toy-power is an option of toy_top1, not of pruning method dp" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
