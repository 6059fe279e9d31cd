"""Faults a real user meets: a disk too small for the output, deltas merged onto a base they were not extracted
from, and errors that must reach the user as one line (never a traceback) from every command."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dppa.cli import main
from dppa.errors import DppaError
from dppa.io.atomic import atomic_dir
from dppa.io.manifest import read_manifest
from dppa.io.space import check_free_space, free_bytes
from tests.helpers.synthetic import make_base, make_finetune

WIDE = dict(vocab_size=1024, hidden_size=256, intermediate_size=512)  # about 7 MB of float32


def run_cli(capsys, *args):
    capsys.readouterr()
    code = main([*map(str, args), "-q"])
    return code, capsys.readouterr().err.strip()


def leftovers(folder: Path, name: str) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


@pytest.fixture
def tmpfs(tmp_path):
    """A real 4 MiB file system (tmpfs), where the machine lets the tests mount one."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    base = make_base(root / "base", **WIDE)
    return base, make_finetune(base, root / "ft", seed=1)


def test_an_output_larger_than_the_free_space_is_refused_before_any_byte(wide, tmpfs, capsys):
    base, ft = wide
    out = tmpfs / "delta"
    code, err = run_cli(capsys, "extract", base, ft, "-o", out)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(tmpfs) in err and "needs about 7." in err and "free" in err, err
    assert list(tmpfs.iterdir()) == []  # refused up front: not even the temporary folder was made


def test_a_zoo_that_cannot_fit_is_refused_before_training(tmpfs, capsys):
    capsys.readouterr()
    code = main(["zoo", str(tmpfs / "zoo"), "--size", "default"])  # four models of 3.7 MB
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "needs about" in err, err
    assert list(tmpfs.iterdir()) == []


def test_the_check_compares_with_the_real_free_space(tmp_path):
    check_free_space(tmp_path / "out", 1 << 20)  # a MiB fits
    with pytest.raises(DppaError, match="needs about .* free"):
        check_free_space(tmp_path / "out", free_bytes(tmp_path) + (1 << 30))


def test_a_disk_that_fills_during_the_write_gives_one_line_and_leaves_nothing(tmpfs):
    # another writer took the space after the check: the write itself hits ENOSPC
    with pytest.raises(DppaError) as caught:
        with atomic_dir(tmpfs / "out") as tmp:
            (tmp / "model.safetensors").write_bytes(b"\0" * (8 << 20))
    assert "the disk filled while writing out" in str(caught.value) and "\n" not in str(caught.value)
    assert list(tmpfs.iterdir()) == []


# ---- deltas carry their base


@pytest.fixture(scope="module")
def two_bases(tmp_path_factory):
    """Base A with a fine-tune and its delta; base C of the same shapes but other weights; base A2 = A with one
    entry changed in the middle of a matrix (the same fingerprint: only the full content hash tells them apart)."""
    root = tmp_path_factory.mktemp("bases")
    a = make_base(root / "A", seed=0)
    make_base(root / "C", seed=5)
    ft = make_finetune(a, root / "ft", seed=1)
    a2 = shutil.copytree(a, root / "A2")
    tensors = load_file(a2 / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    flat = tensors[name].reshape(-1)
    assert flat.numel() > 2 * 512 + 1
    flat[flat.numel() // 2] += 1.0
    save_file(tensors, a2 / "model.safetensors", metadata={"format": "pt"})
    assert main(["extract", str(a), str(ft), "-o", str(root / "delta"), "-q"]) == 0
    return root


def test_a_delta_is_refused_on_another_base_before_any_work(two_bases, tmp_path, capsys):
    out = tmp_path / "merged"
    code, err = run_cli(capsys, "merge", two_bases / "C", two_bases / "delta", "-o", out, "--method", "ties")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(two_bases / "delta") in err and str(two_bases / "A") in err and str(two_bases / "C") in err, err
    assert "fingerprint" in err and "--allow-other-base" in err, err
    assert leftovers(tmp_path, "merged") == []
    code, err = run_cli(capsys, "apply", two_bases / "C", two_bases / "delta", "-o", out)
    assert code == 2 and "--allow-other-base" in err and leftovers(tmp_path, "merged") == []


def test_a_base_with_the_same_fingerprint_is_caught_by_its_content_hash(two_bases, tmp_path, capsys):
    out = tmp_path / "merged"
    code, err = run_cli(capsys, "apply", two_bases / "A2", two_bases / "delta", "-o", out)
    assert code == 2 and len(err.splitlines()) == 1 and "content hash" in err, err
    assert leftovers(tmp_path, "merged") == []  # found as the base was read, before the rename


def test_a_deliberate_transfer_is_merged_and_recorded(two_bases, tmp_path, capsys):
    out = tmp_path / "moved"
    code, _ = run_cli(capsys, "apply", two_bases / "C", two_bases / "delta", "-o", out, "--allow-other-base")
    assert code == 0
    assert read_manifest(out)["other_base"] == [str((two_bases / "delta").resolve())]
    # independently: C + (ft - A), in float32, stored as float32
    c, a, ft = (load_file(two_bases / n / "model.safetensors") for n in ("C", "A", "ft"))
    merged = load_file(out / "model.safetensors")
    for name, tensor in merged.items():
        assert torch.equal(tensor, c[name] + (ft[name] - a[name])), name


def test_the_base_a_delta_came_from_is_its_own(two_bases, tmp_path, capsys):
    code, _ = run_cli(capsys, "apply", two_bases / "A", two_bases / "delta", "-o", tmp_path / "same")
    assert code == 0
    assert "other_base" not in read_manifest(tmp_path / "same")
    assert read_manifest(two_bases / "delta")["base"]["fingerprint"].startswith("fp1:")


# ---- no traceback a user can reach


def _bad_inputs(tmp: Path, base: Path, ft: Path) -> list[list[str]]:
    """Command lines a user gets wrong, one or more per command; every one must fail in one line."""
    (tmp / "nonempty").mkdir()
    (tmp / "nonempty" / "x").write_text("x")
    (tmp / "bad.yaml").write_text("grids: [\n")
    broken = shutil.copytree(ft, tmp / "broken-manifest")
    (broken / "dppa_manifest.json").write_text("{ not json")
    readonly = tmp / "readonly"
    readonly.mkdir(mode=0o500)
    nope = str(tmp / "nope")
    return [
        ["extract", "-q", nope, str(ft), "-o", str(tmp / "o")],
        ["extract", "-q", str(base), str(ft), "-o", "/proc/dppa-out"],  # a folder nobody may write
        ["extract", "-q", str(base), str(broken), "-o", str(tmp / "o")],
        ["prune", "-q", str(ft), "-o", str(tmp / "o"), "--method", "dp", "--density", "0.2"],  # a model, not a delta
        ["prune", "-q", nope, "-o", str(tmp / "o"), "--method", "magnitude", "--density", "1.5"],
        ["amplify", "-q", nope, "-o", str(tmp / "o"), "--densities", "0.2,0.1", "--factors", "1,1"],
        ["merge", "-q", str(base), nope, "-o", str(tmp / "o")],
        ["apply", "-q", str(base), str(ft), "-o", str(tmp / "o")],  # a model where a delta is expected
        ["eval", nope, "--tasks", "zoo_arith"],
        ["eval", str(tmp / "nonempty"), "--tasks", "zoo_arith"],
        ["fetch", "org/model", "--revision", "main", "-o", str(tmp / "o")],  # the hub is off in the tests
        ["grid", nope + ".yaml"],
        ["grid", str(tmp / "bad.yaml")],
        ["init", str(tmp / "nonempty"), "--base", str(base)],
        ["run", "-C", nope],
        ["search", "-q", str(base), nope, "--tasks", "a", "--dense", "b", "-o", str(tmp / "o")],
        ["publish", nope, "--repo", "org/name"],
        ["serve", "--cron", "0 3 * * *", "-C", nope],
        ["zoo", str(tmp / "nonempty")],
    ]


def test_no_command_prints_a_traceback_for_bad_input(tiny_models, tmp_path, capsys):
    base, ft, _ = tiny_models
    failures = []
    for argv in _bad_inputs(tmp_path, base, ft):
        capsys.readouterr()
        code = main(argv)
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        if code == 0 or len(lines) != 1 or "Traceback" in out + err or not lines[0].startswith(f"dppa {argv[0]}"):
            failures.append(f"{' '.join(argv)} -> exit {code}: {err.strip()[:300]}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "o").exists()


def test_a_bug_is_one_line_and_its_traceback_is_behind_debug(tiny_models, tmp_path, capsys, monkeypatch):
    """An unexpected error (not a user's mistake): one line that says how to get the traceback; --debug shows it."""
    from dppa.cli import error_line

    message, code = error_line(ZeroDivisionError("float division by zero"))
    assert code == 1 and "ZeroDivisionError" in message and "--debug" in message
    message, code = error_line(PermissionError(13, "Permission denied", "/srv/models"))
    assert (message, code) == ("/srv/models: Permission denied", 1)
    base, ft, _ = tiny_models
    argv = ["apply", str(base), str(ft), "-o", str(tmp_path / "o")]
    with pytest.raises(DppaError):  # --debug lets the exception through, with its traceback
        main(["--debug", *argv])
    assert "DPPA_DEBUG" not in os.environ  # the flag ended with the command (main may run in-process again)
    monkeypatch.setenv("DPPA_DEBUG", "1")
    with pytest.raises(DppaError):
        main(argv)
