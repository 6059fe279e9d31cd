"""A model written by `dppa merge` equals the same merge computed with plain torch on the state dicts, down to the
logits. The expected merge is written out here (trim by sorting, sign election, disjoint mean), not taken from the
engine."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from dppa.cli import main
from tests.helpers.merge import expected_merge, ties, trim
from tests.helpers.synthetic import make_base, make_finetune


def merge_args(base, inputs, out, method, density):
    args = ["merge", str(base), *map(str, inputs), "-o", str(out), "--method", method, "--scale", "0.7"]
    return args + ["--weights", "1.0,0.5", "-q"] + (["--density", str(density)] if density else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,density", [("ties", 0.2), ("task_arithmetic", None)])
def test_merged_model_logits_equal_plain_torch_merge(tmp_path, dtype, method, density):
    base = make_base(tmp_path / "base", dtype=dtype)
    fts = [make_finetune(base, tmp_path / f"ft{i}", seed=i) for i in (1, 2)]
    deltas = []
    for i, ft in enumerate(fts):
        assert main(["extract", str(base), str(ft), "-o", str(tmp_path / f"d{i}"), "-q"]) == 0
        deltas.append(str(tmp_path / f"d{i}"))
    assert main(merge_args(base, deltas, tmp_path / "merged", method, density)) == 0
    # the same merge straight from the fine-tuned model folders, each delta taken on the fly
    assert main(merge_args(base, fts, tmp_path / "merged_from_models", method, density)) == 0
    expected = expected_merge(base, fts, method, density, 0.7, [1.0, 0.5])
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    ids = torch.arange(1, 33).view(2, 16)
    base_logits = AutoModelForCausalLM.from_pretrained(base)(ids).logits.float()
    for merged in ("merged", "merged_from_models"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / merged)
        assert loaded.dtype == dtype
        got_weights, want_weights = loaded.state_dict(), expected.state_dict()
        for name, want in want_weights.items():
            # equal up to float32 summation order: in bf16 that may flip the last bit of the rounded result
            ulp = 1e-6 if dtype == torch.float32 else 2**-7
            assert torch.allclose(got_weights[name].float(), want.float(), atol=1e-7, rtol=ulp), name
        with torch.no_grad():
            got, want = loaded(ids).logits.float(), expected(ids).logits.float()
        assert torch.allclose(got, want, atol=tolerance, rtol=tolerance)
        assert not torch.allclose(got, base_logits, atol=tolerance)  # the merge changed the model
    # from model folders, the bytes are those of extract + merge
    from_deltas = (tmp_path / "merged" / "model.safetensors").read_bytes()
    assert (tmp_path / "merged_from_models" / "model.safetensors").read_bytes() == from_deltas


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_from_model_folders_with_a_grown_vocabulary(tmp_path, threads, dtype):
    """With one chunk worker the caller's thread hashes the inputs; with more, bf16 thresholds' passes do: the
    manifest's hashes are extract's either way."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _merge_from_model_folders_with_a_grown_vocabulary(tmp_path, dtype)
    finally:
        torch.set_num_threads(previous)


def _merge_from_model_folders_with_a_grown_vocabulary(tmp_path, dtype):
    base = make_base(tmp_path / "base", dtype=dtype)
    fts = [make_finetune(base, tmp_path / "ft1", seed=1, grow_vocab=3), make_finetune(base, tmp_path / "ft2", seed=2)]
    deltas = [tmp_path / "d1", tmp_path / "d2"]
    for ft, delta in zip(fts, deltas):
        assert main(["extract", str(base), str(ft), "-o", str(delta), "-q"]) == 0
    assert main(merge_args(base, deltas, tmp_path / "from_deltas", "ties", 0.3)) == 0
    assert main(merge_args(base, fts, tmp_path / "from_models", "ties", 0.3)) == 0
    got = (tmp_path / "from_models" / "model.safetensors").read_bytes()
    assert got == (tmp_path / "from_deltas" / "model.safetensors").read_bytes()
    # the base's rows only: the added tokens are dropped, as extract drops them
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "from_models")
    assert merged.get_input_embeddings().weight.shape[0] == AutoModelForCausalLM.from_pretrained(base).config.vocab_size
    # provenance: each fine-tune's content hash, the same as extract records for it
    manifest = json.loads((tmp_path / "from_models" / "dppa_manifest.json").read_text())
    extracted = [json.loads((d / "dppa_manifest.json").read_text())["finetuned"] for d in deltas]
    assert [r["content_hash"] for r in manifest["finetuned"]] == [r["content_hash"] for r in extracted]
    assert [r["path"] for r in manifest["finetuned"]] == [str(ft.resolve()) for ft in fts]
    base_of_delta = json.loads((deltas[0] / "dppa_manifest.json").read_text())["base"]["content_hash"]
    assert manifest["base"]["content_hash"] == base_of_delta


@pytest.mark.parametrize("inputs", ["models", "deltas"])
def test_the_compiled_bf16_kernels_write_the_bytes_of_the_torch_path(tmp_path, monkeypatch, inputs):
    """On bf16, `dppa merge` takes each delta, its trim and TIES's combine with dppa/io/_codec.c's kernels where they
    are built; the torch path (every other dtype, a GPU, an install without a C compiler) must give the same bytes."""
    from dppa.merging import merge, ties

    if merge.trimmed_deltas is None or ties.ties_bf16 is None:
        pytest.skip("dppa/io/_codec.c not built")
    base = make_base(tmp_path / "base", dtype=torch.bfloat16)
    sources = [make_finetune(base, tmp_path / f"ft{i}", seed=i, grow_vocab=3 * (i == 1)) for i in (1, 2)]
    if inputs == "deltas":
        for i, ft in enumerate(list(sources)):
            assert main(["extract", str(base), str(ft), "-o", str(tmp_path / f"d{i}"), "-q"]) == 0
            sources[i] = tmp_path / f"d{i}"
    assert main(merge_args(base, sources, tmp_path / "compiled", "ties", 0.2)) == 0
    monkeypatch.setattr(merge, "trimmed_deltas", None)  # every input takes the torch path
    monkeypatch.setattr(ties, "ties_bf16", None)  # and so does the combine
    assert main(merge_args(base, sources, tmp_path / "torch", "ties", 0.2)) == 0
    got = (tmp_path / "compiled" / "model.safetensors").read_bytes()
    assert got == (tmp_path / "torch" / "model.safetensors").read_bytes()


def test_plain_torch_ties_by_hand():
    # the test's own TIES, checked on a hand case: sums [2, 0, 1, 5] -> signs [+, 0, +, +]
    deltas = [
        torch.tensor([1.0, -2.0, 3.0, 0.0]),
        torch.tensor([2.0, 1.0, -4.0, 0.0]),
        torch.tensor([-1.0, 1.0, 2.0, 5.0]),
    ]
    assert ties(deltas, [1.0, 1.0, 1.0]).tolist() == [1.5, 0.0, 2.5, 5.0]
    assert trim(torch.tensor([0.5, -3.0, 1.0, 3.0]), 0.5).tolist() == [0.0, -3.0, 0.0, 3.0]
