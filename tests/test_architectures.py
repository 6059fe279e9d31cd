"""The pruning scope on real architectures, built offline by transformers at tiny sizes, one per family.

Each family: the scope covers exactly the weight matrices of the language model's blocks (enumerated here from the
saved file by a rule of this test), and `extract -> prune --method dp -> amplify -> merge --method ties` of two
fine-tunes (base + seeded noise on every tensor) gives a model that transformers loads and whose logits equal a
plain-torch TIES merge of the amplified deltas read back from disk.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dppa.cli import main as dppa
from dppa.io.reader import open_checkpoint
from dppa.sparsify.scope import compile_scope
from tests.helpers.architectures import (
    FAMILIES,
    block_matrices_by_rule,
    build_base,
    build_gemma3_vlm,
    make_finetune,
)
from tests.helpers.delta_files import load_delta


def ties_by_hand(deltas: list[torch.Tensor]) -> torch.Tensor:
    """TIES on already pruned deltas: elected sign of the sum, mean of the nonzero deltas that agree with it."""
    stack = torch.stack([d.float() for d in deltas])
    agree = (torch.sign(stack) == torch.sign(stack.sum(0))) & (stack != 0)
    return (stack * agree).sum(0) / agree.sum(0).clamp(min=1)


def cli(*argv: str | Path) -> None:
    assert dppa([str(a) for a in argv] + ["-q", "--device", "cpu"]) == 0


def logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.arange(3, 19).view(2, 8)).logits


def run_family(base: Path, tmp: Path) -> None:
    """The whole chain through the CLI, checked against independent computations; returns the table row."""
    fts = [make_finetune(base, tmp / f"ft{i}", seed=i) for i in (1, 2)]
    expected = block_matrices_by_rule(base / "model.safetensors")
    for i, ft in enumerate(fts, 1):
        cli("extract", base, ft, "-o", tmp / f"delta{i}")
    scope = compile_scope("auto", open_checkpoint(tmp / "delta1"))
    assert scope.layers == expected and scope.left_out == []

    cli("prune", tmp / "delta1", "-o", tmp / "pruned", "--method", "dp", "--density", "0.2")
    manifest = json.loads((tmp / "pruned" / "dppa_manifest.json").read_text())
    densities = manifest["module_density"]
    assert set(densities) == set(expected) and manifest["scope_left_out"] == []
    # layer and module adjustments are each at most lamda = 0.08
    assert all(0.2 - 0.16 - 1e-9 <= d <= 0.2 + 0.16 + 1e-9 for d in densities.values())
    pruned, delta = load_delta(tmp / "pruned"), load_delta(tmp / "delta1")
    for name, values in pruned.items():
        if name in expected:  # every block matrix pruned to its DP density (the noise leaves no zero in the delta)
            assert abs(int(values.count_nonzero()) - round(densities[name] * values.numel())) <= 1, name
        else:
            assert torch.equal(values, delta[name]), name

    for i in (1, 2):
        cli("amplify", tmp / f"delta{i}", "-o", tmp / f"amp{i}", "--densities", "0.1,0.2", "--factors", "1.5,1.2")
    cli("merge", base, tmp / "amp1", tmp / "amp2", "-o", tmp / "merged", "--method", "ties")

    amplified = [load_delta(tmp / f"amp{i}") for i in (1, 2)]
    for amp in amplified:  # DPA's output is sparse on every block matrix: at most the top band's density + 2 lamda
        assert all(amp[n].count_nonzero() <= 0.36 * amp[n].numel() + 1 for n in expected)
    reference = {
        name: (t + ties_by_hand([a[name] for a in amplified])).contiguous()
        for name, t in load_file(base / "model.safetensors").items()
    }
    (tmp / "reference").mkdir()
    save_file(reference, tmp / "reference" / "model.safetensors", metadata={"format": "pt"})
    for path in base.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, tmp / "reference" / path.name)
    merged_tensors = load_file(tmp / "merged" / "model.safetensors")
    assert merged_tensors.keys() == reference.keys()
    assert max((merged_tensors[n] - reference[n]).abs().max().item() for n in reference) < 1e-6
    merged_logits, reference_logits = logits(tmp / "merged"), logits(tmp / "reference")
    assert torch.allclose(merged_logits, reference_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged_logits, logits(base), atol=1e-3)  # the merge moved the model


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_end_to_end(model_type, tmp_path):
    base = build_base(model_type, tmp_path / "base")
    run_family(base, tmp_path)


def test_gemma3_vision_language_model(tmp_path):
    """Only the language model's blocks: the vision tower's layer N does not pool with the language model's."""
    base = build_gemma3_vlm(tmp_path / "base")
    names = load_file(base / "model.safetensors")
    assert any("vision_tower.encoder.layers.1.self_attn.q_proj.weight" in n for n in names)  # the case exists
    run_family(base, tmp_path)
