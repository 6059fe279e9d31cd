"""Bad input: one line naming the file or tensor, a non-zero exit, and nothing half-written left behind."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dppa.cli import main
from tests.helpers.synthetic import make_base


def run_cli(capsys, *args):
    capsys.readouterr()  # drop what set-up printed
    code = main([*map(str, args), "-q"])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_clean_failure(code, err, out, *needles):
    assert code != 0
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert str(needle) in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary folder left behind"


@pytest.fixture
def ft_copy(tiny_models, tmp_path):
    """A writable copy of a fine-tune, to damage."""
    _, ft1, _ = tiny_models
    return shutil.copytree(ft1, tmp_path / "ft")


def test_different_architecture(tiny_models, tmp_path, capsys):
    base, _, _ = tiny_models
    other = make_base(tmp_path / "other", hidden_size=48, intermediate_size=96)
    out = tmp_path / "out"
    code, err = run_cli(capsys, "extract", base, other, "-o", out)
    assert_clean_failure(code, err, out, other / "config.json", "hidden_size")


def test_missing_tensor(tiny_models, ft_copy, tmp_path, capsys):
    base, _, _ = tiny_models
    tensors = load_file(ft_copy / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, ft_copy / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, err = run_cli(capsys, "extract", base, ft_copy, "-o", out)
    assert_clean_failure(code, err, out, "model.layers.1.self_attn.v_proj.weight", ft_copy)


def test_truncated_safetensors(tiny_models, ft_copy, tmp_path, capsys):
    base, _, _ = tiny_models
    path = ft_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    out = tmp_path / "out"
    code, err = run_cli(capsys, "extract", base, ft_copy, "-o", out)
    assert_clean_failure(code, err, out, path, "truncated")


def test_corrupt_safetensors_header(tiny_models, ft_copy, tmp_path, capsys):
    base, _, _ = tiny_models
    path = ft_copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    code, err = run_cli(capsys, "extract", base, ft_copy, "-o", out)
    assert_clean_failure(code, err, out, path, "corrupt")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_tensor(tiny_models, ft_copy, tmp_path, capsys, bad):
    base, _, _ = tiny_models
    tensors = load_file(ft_copy / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"][3, 5] = bad
    save_file(tensors, ft_copy / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, err = run_cli(capsys, "extract", base, ft_copy, "-o", out)
    assert_clean_failure(code, err, out, "model.layers.0.mlp.down_proj.weight", "NaN or Inf", ft_copy)


@pytest.mark.parametrize("density", ["1.5", "0", "-0.2"])
def test_density_outside_unit_interval(tiny_models, tmp_path, capsys, density):
    base, ft1, _ = tiny_models
    delta = tmp_path / "delta"
    assert main(["extract", str(base), str(ft1), "-o", str(delta), "-q"]) == 0
    out = tmp_path / "out"
    code, err = run_cli(capsys, "prune", delta, "-o", out, "--method", "dp", "--density", density)
    assert_clean_failure(code, err, out, "--density", density)
    code, err = run_cli(capsys, "merge", base, delta, "-o", out, "--density", density)
    assert_clean_failure(code, err, out, "--density")


def test_existing_output_is_refused_unless_overwrite(tiny_models, tmp_path, capsys):
    base, ft1, _ = tiny_models
    out = tmp_path / "delta"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    code, err = run_cli(capsys, "extract", base, ft1, "-o", out)
    assert code != 0 and len(err.splitlines()) == 1 and str(out) in err and "--overwrite" in err
    assert (out / "precious.txt").read_text() == "user data"
    assert run_cli(capsys, "extract", base, ft1, "-o", out, "--overwrite")[0] == 0
    assert not (out / "precious.txt").exists() and any(out.glob("*.safetensors"))


def test_pickle_checkpoints_are_refused_unless_allowed(tiny_models, tmp_path, capsys):
    base, ft1, _ = tiny_models
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(ft1 / "config.json", pickled / "config.json")
    torch.save(load_file(ft1 / "model.safetensors"), pickled / "pytorch_model.bin")
    out = tmp_path / "out"
    code, err = run_cli(capsys, "extract", base, pickled, "-o", out)
    assert_clean_failure(code, err, out, "pytorch_model.bin", "--allow-pickle")
    assert run_cli(capsys, "extract", base, pickled, "-o", out, "--allow-pickle")[0] == 0
    reference = tmp_path / "reference"
    assert run_cli(capsys, "extract", base, ft1, "-o", reference)[0] == 0

    def weights(folder):
        return {f.name: f.read_bytes() for f in folder.glob("*.safetensors")}

    assert weights(out) == weights(reference) and len(weights(out)) == 2  # the shared shard and the blocks' shard


@pytest.mark.parametrize(
    "command", [["prune", "--method", "dp", "--density", "0.2"], ["amplify", "--factors", "1.8,1.0"]]
)
def test_a_model_folder_is_not_a_delta(tiny_models, tmp_path, capsys, command):
    base, ft1, ft2 = tiny_models
    out = tmp_path / "out"
    # a plain model folder (no dppa manifest at all)
    code, err = run_cli(capsys, command[0], ft1, "-o", out, *command[1:])
    assert_clean_failure(code, err, out, ft1, "is a model folder, not a delta", "dppa extract BASE MODEL")
    # a model written by dppa (manifest kind "model")
    deltas = [tmp_path / "d1", tmp_path / "d2"]
    for ft, delta in zip((ft1, ft2), deltas):
        assert run_cli(capsys, "extract", base, ft, "-o", delta)[0] == 0
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", base, *deltas, "-o", merged, "--method", "task_arithmetic")[0] == 0
    code, err = run_cli(capsys, command[0], merged, "-o", out, *command[1:])
    assert_clean_failure(code, err, out, merged, "is a model folder, not a delta")


def test_merge_refuses_a_mix_of_deltas_and_model_folders(tiny_models, tmp_path, capsys):
    base, ft1, ft2 = tiny_models
    delta = tmp_path / "d2"
    assert run_cli(capsys, "extract", base, ft2, "-o", delta)[0] == 0
    out = tmp_path / "out"
    code, err = run_cli(capsys, "merge", base, ft1, delta, "-o", out, "--method", "task_arithmetic")
    assert_clean_failure(code, err, out, f"delta folders ({delta})", f"model folders ({ft1})", "only deltas")
    # apply takes one delta: a model folder is still refused there
    code, err = run_cli(capsys, "apply", base, ft1, "-o", out)
    assert_clean_failure(code, err, out, ft1, "is a model folder, not a delta")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", [["ties", "--density", "0.2"], ["task_arithmetic"]])
def test_merge_of_model_folders_refuses_nan_or_inf(tiny_models, ft_copy, tmp_path, capsys, bad, method):
    base, _, ft2 = tiny_models
    tensors = load_file(ft_copy / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"][3, 5] = bad
    save_file(tensors, ft_copy / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, err = run_cli(capsys, "merge", base, ft2, ft_copy, "-o", out, "--method", *method)
    assert_clean_failure(code, err, out, "model.layers.0.mlp.down_proj.weight", "NaN or Inf", ft_copy)


@pytest.mark.parametrize(
    "args,needles",
    [
        (["prune", "--method", "dp", "--density", "0.2", "--seed", "3"], ["--seed", "dare", "dp"]),
        (["prune", "--method", "dp", "--density", "0.2", "--lamda", "1.5"], ["--lamda 1.5", "[0, 1)"]),
        (["prune", "--method", "dp", "--density", "0.2", "--module-mult", "0"], ["--module-mult 0", "> 0"]),
        (["amplify", "--factors", "1,1", "--layer-mult", "-1"], ["--layer-mult -1", "> 0"]),
    ],
)
def test_bad_or_misplaced_method_options(tiny_models, tmp_path, capsys, args, needles):
    base, ft1, _ = tiny_models
    delta = tmp_path / "delta"
    assert run_cli(capsys, "extract", base, ft1, "-o", delta)[0] == 0
    out = tmp_path / "out"
    code, err = run_cli(capsys, args[0], delta, "-o", out, *args[1:])
    assert_clean_failure(code, err, out, *needles)


def test_trim_density_with_task_arithmetic_is_refused(tiny_models, tmp_path, capsys):
    base, ft1, _ = tiny_models
    delta = tmp_path / "delta"
    assert run_cli(capsys, "extract", base, ft1, "-o", delta)[0] == 0
    out = tmp_path / "out"
    code, err = run_cli(capsys, "merge", base, delta, "-o", out, "--method", "task_arithmetic", "--density", "0.2")
    assert_clean_failure(code, err, out, "--density is an option of ties, not of merge method task_arithmetic")


def test_merge_refuses_a_delta_missing_a_tensor_of_the_base(tiny_models, tmp_path, capsys):
    base, ft1, ft2 = tiny_models
    deltas = []
    for ft in (ft1, ft2):
        assert run_cli(capsys, "extract", base, ft, "-o", tmp_path / ft.name)[0] == 0
        deltas.append(tmp_path / ft.name)
    name = "model.layers.0.mlp.up_proj.weight"
    shard = next(p for p in deltas[1].glob("*.safetensors") if name in load_file(p))
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "merged"
    code, err = run_cli(capsys, "merge", base, *deltas, "-o", out, "--method", "task_arithmetic")
    assert_clean_failure(code, err, out, name, deltas[1], "extracted from this base")
