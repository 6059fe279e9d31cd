"""A scope never leaves block weight matrices dense silently: unknown architectures are refused with the --scope to
pass, and a user regex that leaves matrices out says so in one line and lists them in the manifest."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from dppa.cli import main as dppa
from dppa.io.manifest import write_manifest
from dppa.io.reader import open_checkpoint
from dppa.sparsify.scope import compile_scope
from tests.helpers.architectures import block_matrices_by_rule, build_base, make_finetune
from tests.helpers.delta_files import load_delta

OLD_LLAMA_SCOPE = r"^(?:.*\.)?layers\.(?P<layer>\d+)\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.weight$"


@pytest.fixture(scope="module")
def deltas(tmp_path_factory):
    """{model_type: delta folder} for llama and phi3 (fused qkv_proj and gate_up_proj)."""
    root = tmp_path_factory.mktemp("scope")
    out = {}
    for model_type in ("llama", "phi3"):
        base = build_base(model_type, root / model_type / "base")
        ft = make_finetune(base, root / model_type / "ft", seed=1)
        assert dppa(["extract", str(base), str(ft), "-o", str(root / model_type / "delta"), "-q"]) == 0
        out[model_type] = root / model_type / "delta"
    return out


def copy_delta(src, dst, model_type=None):
    shutil.copytree(src, dst)
    if model_type is None:
        (dst / "config.json").unlink()
    else:
        config = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    return dst


def prune(delta, out, *scope):
    return dppa(["prune", str(delta), "-o", str(out), "--method", "dp", "--density", "0.2", "-q", *scope])


def test_unknown_architecture_is_refused_with_the_scope_to_pass(deltas, tmp_path, capsys):
    delta = copy_delta(deltas["llama"], tmp_path / "delta", model_type="mystery_lm")
    assert prune(delta, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    assert "model_type 'mystery_lm'" in err and "model.layers.0.mlp.down_proj.weight" in err and "11 more" in err
    suggested = re.search(r"--scope '(.+)'$", err.strip()).group(1)

    assert prune(delta, tmp_path / "out", "--scope", suggested) == 0
    manifest = json.loads((tmp_path / "out" / "dppa_manifest.json").read_text())
    assert set(manifest["module_density"]) == set(block_matrices_by_rule(delta))
    assert manifest["scope_left_out"] == []


def test_missing_config_is_refused(deltas, tmp_path, capsys):
    delta = copy_delta(deltas["llama"], tmp_path / "delta")
    assert prune(delta, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "no config.json says which architecture" in err and "--scope '^model\\.layers\\.(?P<layer>" in err


def test_no_blocks_at_all_is_refused(tmp_path, capsys):
    (tmp_path / "delta").mkdir()
    save_file(
        {"encoder.weight": torch.ones(4, 4), "head.weight": torch.ones(2, 4)},
        tmp_path / "delta" / "model.safetensors",
        metadata={"format": "pt"},
    )
    write_manifest(tmp_path / "delta", {"kind": "delta"})  # a delta, so that the scope is what gets refused
    assert prune(tmp_path / "delta", tmp_path / "out") == 2
    assert "no tensor looks like a transformer block" in capsys.readouterr().err


def test_user_scope_that_leaves_fused_projections_out_says_so(deltas, tmp_path, capsys):
    assert prune(deltas["phi3"], tmp_path / "out", "--scope", OLD_LLAMA_SCOPE) == 0
    note = [line for line in capsys.readouterr().err.splitlines() if "note" in line]
    assert len(note) == 1 and "leaves 4 block weight matrices" in note[0] and "qkv_proj" in note[0]
    manifest = json.loads((tmp_path / "out" / "dppa_manifest.json").read_text())
    fused = {f"model.layers.{i}.{m}.weight" for i in (0, 1) for m in ("self_attn.qkv_proj", "mlp.gate_up_proj")}
    assert set(manifest["scope_left_out"]) == fused
    pruned, delta = load_delta(tmp_path / "out"), load_delta(deltas["phi3"])
    assert all(torch.equal(pruned[n], delta[n]) for n in fused)  # left dense, as the note says


def test_stacked_expert_weights_are_named_not_pruned(deltas, tmp_path, capsys):
    delta = copy_delta(deltas["llama"], tmp_path / "delta", model_type="llama")
    tensors = load_delta(delta)
    tensors["model.layers.1.mlp.experts.gate_up_proj"] = torch.ones(4, 8, 32)
    for file in [*delta.glob("*.safetensors"), delta / "model.safetensors.index.json"]:
        file.unlink()
    save_file(tensors, delta / "model.safetensors", metadata={"format": "pt"})
    scope = compile_scope("auto", open_checkpoint(delta))
    assert scope.left_out == ["model.layers.1.mlp.experts.gate_up_proj"]
    assert "model.layers.1.mlp.experts.gate_up_proj" in capsys.readouterr().err
    assert set(scope.layers) == set(block_matrices_by_rule(deltas["llama"]))


def test_a_regex_without_a_checkpoint_matches_by_name():
    scope = compile_scope(r"^blocks\.(\d+)\.w$")
    assert scope.layer_of("blocks.7.w") == 7 and scope.layer_of("blocks.7.b") is None
