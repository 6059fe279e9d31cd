import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from dppa.extract import extract_delta
from dppa.io.content_hash import ContentHasher, tensor_bytes
from dppa.io.reader import open_checkpoint
from dppa.merging.merge import apply_delta, merge_deltas
from tests.helpers.synthetic import make_finetune


def test_extract_records_provenance_and_statistics(tiny_models, tmp_path):
    base, ft1, _ = tiny_models
    out = extract_delta(base, ft1, tmp_path / "delta", progress=False)
    manifest = json.loads((out / "dppa_manifest.json").read_text())
    assert manifest["kind"] == "delta" and len(manifest["content_hash"]) == 64
    assert manifest["base"]["path"] == str(base.resolve()) and len(manifest["finetuned"]["content_hash"]) == 64
    b, f, d = open_checkpoint(base), open_checkpoint(ft1), open_checkpoint(out)
    name = "model.layers.1.mlp.up_proj.weight"
    expected = f.get(name) - b.get(name)
    assert torch.equal(d.get(name), expected)
    stats = manifest["tensors"][name]
    assert stats["numel"] == expected.numel()
    assert stats["mean_abs"] == pytest.approx(float(expected.abs().mean()), rel=1e-5)
    assert stats["max_abs"] == pytest.approx(float(expected.abs().max()))
    # same inputs, same content hash, whatever the shard size
    again = extract_delta(base, ft1, tmp_path / "delta2", progress=False, max_shard_size="20KB")
    assert len(list(again.glob("*.safetensors"))) > 1 and (again / "model.safetensors.index.json").exists()
    assert json.loads((again / "dppa_manifest.json").read_text())["content_hash"] == manifest["content_hash"]


def content_hash(folder):
    reader = open_checkpoint(folder)
    hasher = ContentHasher()
    for name in reader.names():
        hasher.start(name, reader.dtype(name), reader.shape(name))
        hasher.update(tensor_bytes(reader.get(name)))
    return hasher.hexdigest()


def test_recorded_input_hashes_are_the_inputs_hashes(tiny_models, tmp_path):
    # float32 inputs: a computation in place on the read buffer would change what gets hashed
    base, ft1, ft2 = tiny_models
    d1 = extract_delta(base, ft1, tmp_path / "d1", progress=False)
    d2 = extract_delta(base, ft2, tmp_path / "d2", progress=False)
    manifest = json.loads((d1 / "dppa_manifest.json").read_text())
    assert manifest["base"]["content_hash"] == content_hash(base)
    assert manifest["finetuned"]["content_hash"] == content_hash(ft1)
    assert manifest["content_hash"] == content_hash(d1)
    merged = merge_deltas(base, [d1, d2], tmp_path / "merged", method="ties", options={"density": 0.5}, progress=False)
    merged_manifest = json.loads((merged / "dppa_manifest.json").read_text())
    assert merged_manifest["base"]["content_hash"] == content_hash(base)
    assert merged_manifest["content_hash"] == content_hash(merged)


def test_delta_dtype_option(tiny_models, tmp_path):
    base, ft1, _ = tiny_models
    out = extract_delta(base, ft1, tmp_path / "d16", dtype="bfloat16", progress=False)
    reader = open_checkpoint(out)
    assert all(reader.dtype(n) == torch.bfloat16 for n in reader.names())


def test_vocabulary_growth_keeps_base_rows(tiny_models, tmp_path):
    base, _, _ = tiny_models
    grown = make_finetune(base, tmp_path / "grown", seed=3, grow_vocab=5)
    out = extract_delta(base, grown, tmp_path / "delta", progress=False)
    manifest = json.loads((out / "dppa_manifest.json").read_text())
    assert manifest["vocab_growth"] == {"lm_head.weight": [64, 69], "model.embed_tokens.weight": [64, 69]}
    b, g, d = open_checkpoint(base), open_checkpoint(grown), open_checkpoint(out)
    name = "model.embed_tokens.weight"
    assert d.shape(name) == (64, 32)
    assert torch.equal(d.get(name), g.get(name)[:64] - b.get(name))
    model = apply_delta(base, out, tmp_path / "applied", progress=False)
    assert AutoModelForCausalLM.from_pretrained(model).config.vocab_size == 64


def test_sharded_output_loads_in_transformers(tiny_models, tmp_path):
    base, ft1, _ = tiny_models
    delta = extract_delta(base, ft1, tmp_path / "delta", progress=False)
    model_dir = apply_delta(base, delta, tmp_path / "model", progress=False, max_shard_size="30KB")
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = AutoModelForCausalLM.from_pretrained(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(ft1)
    for (name, p), (_, q) in zip(loaded.state_dict().items(), reference.state_dict().items()):
        assert torch.allclose(p, q, atol=1e-6), name
