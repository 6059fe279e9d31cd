"""PEFT LoRA adapters as fine-tunes, checked against the real peft library.

Each case builds a tiny random model with transformers, wraps it with peft, gives every LoRA factor (and every
`modules_to_save` copy) random values, and saves the adapter; peft's own `merge_and_unload()` then writes the merged
model. The expected delta is that merged model minus the base, computed here with plain torch on the saved state
dicts; `dppa extract BASE ADAPTER` must give it (float32, max |diff| <= 1e-6), and merging adapters must give the
same bytes as merging their merged folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dppa.errors import DppaError
from dppa.extract import extract_delta
from dppa.io.manifest import read_manifest
from dppa.merging.merge import merge_deltas
from tests.helpers.delta_files import load_delta

peft = pytest.importorskip("peft")

SMALL = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
CONFIGS = {
    "llama": SMALL,
    "qwen2": SMALL,  # q/k/v biases, which LoRA leaves alone
    "gpt2": dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64),  # Conv1D: fan_in_fan_out
}
ALL_LINEAR = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def build_base(model_type: str, folder: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **CONFIGS[model_type]))
    model.save_pretrained(folder)
    return model


def make_adapter(model_type: str, tmp: Path, name: str, seed: int, **lora) -> tuple[Path, Path, Path]:
    """(base folder, adapter folder, merge_and_unload folder) for a LoraConfig of `lora`'s options."""
    base = tmp / "base"
    model = build_base(model_type, base) if not base.exists() else _load(base)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in wrapped.named_parameters():
            if "lora_" in pname or "modules_to_save" in pname:  # B starts at zero: give every factor values
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    adapter, merged = tmp / f"{name}-adapter", tmp / f"{name}-merged"
    wrapped.save_pretrained(adapter)
    wrapped.merge_and_unload().save_pretrained(merged)
    return base, adapter, merged


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def expected_delta(base: Path, merged: Path) -> dict[str, torch.Tensor]:
    b, m = load_file(base / "model.safetensors"), load_file(merged / "model.safetensors")
    assert set(b) == set(m)
    return {n: m[n].float() - b[n].float() for n in b}


def assert_delta_matches(delta_dir: Path, expected: dict[str, torch.Tensor]) -> None:
    got = load_delta(delta_dir)
    assert set(got) == set(expected)
    for name, want in expected.items():
        diff = (got[name].float() - want).abs().max().item()
        assert diff <= 1e-6, f"{name}: max |diff| {diff}"


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_plain_lora_delta_equals_peft_merge(model_type, tmp_path):
    lora = dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR[model_type], fan_in_fan_out=model_type == "gpt2")
    base, adapter, merged = make_adapter(model_type, tmp_path, "ft", seed=1, **lora)
    expected = expected_delta(base, merged)
    delta = extract_delta(base, adapter, tmp_path / "delta", progress=False)
    assert_delta_matches(delta, expected)
    got = load_delta(delta)
    adapted = [n for n in got if any(f".{m}.weight" in n for m in ALL_LINEAR[model_type])]
    assert adapted and all(got[n].abs().max() > 0 for n in adapted)  # every adapted module moved
    untouched = [n for n in got if n not in adapted]
    assert untouched and all(not got[n].any() for n in untouched)  # everything else exactly zero
    manifest = read_manifest(delta)
    assert manifest["finetuned"]["adapter"]["adapted"] == sorted(adapted)
    # the fine-tune's content hash is that of the model peft's merge wrote
    assert (
        manifest["finetuned"]["content_hash"]
        == read_manifest(extract_delta(base, merged, tmp_path / "delta-from-merged", progress=False))["finetuned"][
            "content_hash"
        ]
    )


def test_rslora_rank_and_alpha_patterns(tmp_path):
    lora = dict(
        r=4,
        lora_alpha=6,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6},
        alpha_pattern={"v_proj": 3},
    )
    base, adapter, merged = make_adapter("llama", tmp_path, "rs", seed=2, **lora)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_rslora"] and config["rank_pattern"]
    assert_delta_matches(extract_delta(base, adapter, tmp_path / "delta", progress=False), expected_delta(base, merged))


def test_modules_to_save_and_embedding_adapter(tmp_path):
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])
    base, adapter, merged = make_adapter("llama", tmp_path, "emb", seed=3, **lora)
    files = load_file(adapter / "adapter_model.safetensors")
    assert any("lora_embedding_A" in n for n in files) and "base_model.model.lm_head.weight" in files
    expected = expected_delta(base, merged)
    assert expected["lm_head.weight"].abs().max() > 0 and expected["model.embed_tokens.weight"].abs().max() > 0
    delta = extract_delta(base, adapter, tmp_path / "delta", progress=False)
    assert_delta_matches(delta, expected)
    assert read_manifest(delta)["finetuned"]["adapter"]["replaced"] == ["lm_head.weight", "model.embed_tokens.weight"]


def test_merge_of_adapters_equals_merge_of_merged_folders(tmp_path):
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    base, ad1, m1 = make_adapter("llama", tmp_path, "a", seed=4, **lora)
    _, ad2, m2 = make_adapter("llama", tmp_path, "b", seed=5, **{**lora, "target_modules": ["q_proj", "o_proj"]})
    kwargs = dict(method="ties", options={"density": 0.3}, models=True, progress=False)
    from_adapters = merge_deltas(base, [ad1, ad2], tmp_path / "from-adapters", **kwargs)
    from_merged = merge_deltas(base, [m1, m2], tmp_path / "from-merged", **kwargs)
    assert (from_adapters / "model.safetensors").read_bytes() == (from_merged / "model.safetensors").read_bytes()
    records = read_manifest(from_adapters)["finetuned"]
    assert all("adapter" in r for r in records)  # the lineage names the adapters, with the merged models' hashes
    assert [r["content_hash"] for r in records] == [r["content_hash"] for r in read_manifest(from_merged)["finetuned"]]


def test_dora_ia3_and_pickled_adapters_are_refused(tmp_path):
    base, adapter, _ = make_adapter("llama", tmp_path, "plain", seed=6, r=2, lora_alpha=4, target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())

    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(DppaError, match=r"adapter_config.json: DoRA \(use_dora\) is not supported"):
        extract_delta(base, dora, tmp_path / "out-dora", progress=False)

    ia3 = tmp_path / "ia3"
    peft.get_peft_model(_load(base), peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"])).save_pretrained(
        ia3
    )
    with pytest.raises(DppaError, match=r"peft_type 'IA3' adapters are not supported \(LORA only\)"):
        merge_deltas(base, [ia3], tmp_path / "out-ia3", models=True, progress=False)

    pickled = tmp_path / "pickled"
    wrapped = peft.get_peft_model(_load(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    wrapped.save_pretrained(pickled, safe_serialization=False)
    assert (pickled / "adapter_model.bin").exists()
    with pytest.raises(DppaError, match=r"adapter_model.bin: pickle checkpoints can run code"):
        extract_delta(base, pickled, tmp_path / "out-pickle", progress=False)
    assert not (tmp_path / "out-pickle").exists()
    extract_delta(base, pickled, tmp_path / "out-pickle", progress=False, allow_pickle=True)


def test_adapter_for_another_base_is_refused(tmp_path):
    _, adapter, _ = make_adapter("llama", tmp_path, "llama", seed=7, r=2, lora_alpha=4, target_modules=["q_proj"])
    other = tmp_path / "other"
    other.mkdir()
    gpt2 = build_base("gpt2", other / "base")
    del gpt2
    with pytest.raises(DppaError, match=r"the adapter's 'model.layers.0.self_attn.q_proj.weight' matches no tensor"):
        extract_delta(other / "base", adapter, tmp_path / "out", progress=False)


def _header(file: Path) -> dict:
    import struct

    with open(file, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(length))


def test_untouched_modules_cost_no_disk_through_extract_prune_amplify(tmp_path):
    from dppa.io.reader import open_checkpoint
    from dppa.sparsify.bands import amplify_delta
    from dppa.sparsify.prune import prune_delta

    base, adapter, merged = make_adapter("llama", tmp_path, "qv", seed=5, r=4, lora_alpha=8, target_modules=["q_proj"])
    delta = extract_delta(base, adapter, tmp_path / "delta", progress=False)
    assert_delta_matches(delta, expected_delta(base, merged))  # the zeros read back as zeros, peft's merge agrees
    state = load_file(base / "model.safetensors")
    touched = {n for n in state if ".q_proj." in n}
    untouched = set(state) - touched
    # the files hold the q_proj deltas only: every other tensor is listed in a header, stored as nothing
    files = sorted(delta.glob("*.safetensors"))
    listed = set().union(*(json.loads(_header(f)["__metadata__"].get("dppa_zero", "{}")) for f in files))
    stored = set().union(*(set(_header(f)) - {"__metadata__"} for f in files))
    assert listed == untouched and stored == touched
    dense = sum(t.numel() * t.element_size() for t in state.values())
    on_disk = sum(f.stat().st_size for f in files)
    q_bytes = sum(state[n].numel() * state[n].element_size() for n in touched)
    assert q_bytes <= on_disk < q_bytes + 4096 < dense  # headers apart, only q_proj's bytes
    assert read_manifest(delta)["storage"]["zero_tensors"] == len(untouched)
    # pruning and amplifying keep them as nothing, and the shared shard (embeddings, norms) is linked, not written
    pruned = prune_delta(delta, tmp_path / "pruned", method="dp", density=0.2, progress=False)
    amplified = amplify_delta(delta, tmp_path / "amplified", densities=[0.1, 0.2], factors=[1.8, 1.0], progress=False)
    for folder in (pruned, amplified):
        record = read_manifest(folder)["storage"]
        zero_blocks = {n for n in untouched if ".layers." in n and n.endswith("proj.weight")}
        assert record["zero_tensors"] == len(untouched) and record["linked_shards"] == record["shared_shards"] == 1
        got = load_delta(folder)
        assert set(got) == set(state) and all(not got[n].any() for n in untouched)
        with open_checkpoint(folder) as reader:  # dppa's own reader gives the same tensors (scaled shard included)
            assert all(torch.equal(reader.get(n), got[n]) for n in state)
        assert zero_blocks and all(got[n].shape == state[n].shape for n in zero_blocks)


def test_a_frozen_embedding_of_a_full_fine_tune_is_stored_as_nothing(tmp_path):
    from safetensors.torch import save_file

    base = tmp_path / "base"
    build_base("llama", base)
    state = load_file(base / "model.safetensors")
    moved = {n: (t + 0.01 if ".layers." in n else t.clone()) for n, t in state.items()}  # embedding, norms frozen
    ft = tmp_path / "ft"
    ft.mkdir()
    save_file(moved, str(ft / "model.safetensors"), metadata={"format": "pt"})
    (ft / "config.json").write_text((base / "config.json").read_text())
    delta = extract_delta(base, ft, tmp_path / "delta", progress=False)
    frozen = {n for n in state if ".layers." not in n}
    assert read_manifest(delta)["storage"]["zero_tensors"] == len(frozen)
    got = load_delta(delta)
    assert all(not got[n].any() for n in frozen) and all(got[n].abs().min() > 0 for n in state if n not in frozen)
