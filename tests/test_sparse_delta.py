"""Sparse delta files: written where smaller, read as the dense tensors they encode by everything that reads deltas,
and merges from them bit-identical to merges from dense files. The independent side is tests/helpers/delta_files.py
(safetensors + numpy's unpackbits) and plain torch on state dicts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from dppa.cli import main as dppa
from dppa.errors import DppaError
from dppa.evaluation.weights import CandidateWeights
from dppa.extract import extract_delta
from dppa.io import codec, sparse
from dppa.io.manifest import read_manifest
from dppa.io.reader import open_checkpoint
from dppa.io.writer import DeltaWriter
from dppa.merging.merge import apply_delta, merge_deltas
from dppa.sparsify.bands import amplify_delta
from dppa.sparsify.prune import prune_delta
from tests.helpers.delta_files import load_delta

NUMEL = 3 * sparse.BLOCK + 1234  # several blocks and a partial one


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes, so -0.0 and 0.0 differ."""
    return t.contiguous().view(torch.uint8)


def hand_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(NUMEL, generator=gen).to(torch.bfloat16)
    keep = torch.rand(NUMEL, generator=gen) < 0.2
    pruned = torch.where(keep, values, torch.zeros((), dtype=torch.bfloat16))
    pruned[[5, 65_536, NUMEL - 1]] = -0.0  # as pruning leaves where it drops a negative entry: stored as +0.0
    return {
        "layers.0.w": pruned.view(NUMEL // 2, 2),
        "layers.0.dense": torch.randn(300, generator=gen).to(torch.bfloat16),  # no zero: stays dense
        "layers.0.empty": torch.zeros(0, 4, dtype=torch.bfloat16),
    }


def write(folder: Path, tensors: dict[str, torch.Tensor], **kwargs) -> DeltaWriter:
    folder.mkdir()
    writer = DeltaWriter(folder, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], 5 * 10**9, **kwargs)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    return writer


@pytest.mark.parametrize("kernels", ["default", "numpy"])
def test_sparse_file_decodes_to_the_exact_bytes_and_reads_any_range(tmp_path, monkeypatch, kernels):
    if kernels == "numpy":  # what an install without the compiled dppa/io/_codec.c reads with
        monkeypatch.setattr(codec, "count_kept", codec.count_kept_numpy)
        monkeypatch.setattr(codec, "expand", codec.expand_numpy)
    tensors = hand_tensors()
    writer = write(tmp_path / "d", tensors)
    assert writer.sparse_tensors == 1  # the dense and the empty tensor are stored plain
    decoded = load_delta(tmp_path / "d")  # the safetensors library reads the file; numpy decodes the mask
    assert set(decoded) == set(tensors)
    for name, tensor in tensors.items():
        expected = torch.where(tensor == 0, 0.0, tensor).to(tensor.dtype)  # +0.0 for -0.0, else the same bits
        assert decoded[name].shape == tensor.shape and torch.equal(bits(decoded[name]), bits(expected)), name
    assert int(decoded["layers.0.w"].view(torch.int16).eq(-32768).sum()) == 0  # no -0.0 left
    reader = open_checkpoint(tmp_path / "d")
    flat = decoded["layers.0.w"].reshape(-1)
    assert reader.shape("layers.0.w") == (NUMEL // 2, 2) and reader.dtype("layers.0.w") == torch.bfloat16
    for start, count in [
        (0, NUMEL),
        (3, 17),
        (sparse.BLOCK - 5, 11),
        (sparse.BLOCK, 1),
        (sparse.BLOCK, sparse.BLOCK),  # ends on a block: the block counts give the number of values
        (5, 2 * sparse.BLOCK - 5),
        (70_001, 120_000),
        (NUMEL - 9, 9),
    ]:
        assert torch.equal(bits(reader.read_flat("layers.0.w", start, count)), bits(flat[start : start + count]))
    # bf16 at density 0.2: values 0.2 x 2 bytes + mask 1/8 byte + counts, per element
    info = reader.info("layers.0.w")
    assert info.stored_bytes <= 0.3 * info.nbytes
    assert sparse.part_name("layers.0.w", "values") in load_file(tmp_path / "d" / "model.safetensors")


def part_offset(file: Path, name: str) -> int:
    """The absolute byte offset of stored tensor `name` in a safetensors file (read from its header by hand)."""
    data = file.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    return 8 + header_len + json.loads(data[8 : 8 + header_len])[name]["data_offsets"][0]


@pytest.mark.parametrize("part, at, value", [("mask", 7, 0xFF), ("counts", 8, 2**40)])
def test_a_corrupt_sparse_tensor_is_refused_not_misread(tmp_path, part, at, value):
    """A mask that keeps other elements than its values, or block counts out of order: the file is named as corrupt."""
    write(tmp_path / "d", hand_tensors())
    file = tmp_path / "d" / "model.safetensors"
    data = bytearray(file.read_bytes())
    offset = part_offset(file, sparse.part_name("layers.0.w", part)) + at
    width = 1 if part == "mask" else 8
    data[offset : offset + width] = value.to_bytes(width, "little")
    file.write_bytes(bytes(data))
    reader = open_checkpoint(tmp_path / "d")
    with pytest.raises(DppaError, match=f"{file}: sparse tensor.*the file is corrupt"):
        reader.read_flat("layers.0.w")


def test_dense_storage_writes_plain_safetensors(tmp_path):
    tensors = hand_tensors()
    write(tmp_path / "d", tensors, sparse=False)
    write(tmp_path / "s", tensors)
    plain, decoded = load_file(tmp_path / "d" / "model.safetensors"), load_delta(tmp_path / "s")
    assert set(plain) == set(tensors) and all(torch.equal(bits(plain[n]), bits(decoded[n])) for n in tensors)
    assert torch.equal(plain["layers.0.w"], tensors["layers.0.w"])  # the same values (-0.0 == 0.0)


def test_a_newer_format_version_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    meta = {**sparse.header_metadata({}), "dppa_format_version": "99"}
    save_file({"x": torch.ones(2)}, tmp_path / "d" / "model.safetensors", metadata={"format": "pt", **meta})
    with pytest.raises(DppaError, match=r"model\.safetensors: .*version '99'.*upgrade dppa"):
        open_checkpoint(tmp_path / "d")


@pytest.fixture(scope="module")
def pruned_pairs(tiny_models, tmp_path_factory):
    """Two fine-tunes' DP-pruned and amplified deltas, each written sparse and dense."""
    base, ft1, ft2 = tiny_models
    root = tmp_path_factory.mktemp("sparse_pairs")
    out = {}
    for i, ft in enumerate((ft1, ft2), 1):
        delta = extract_delta(base, ft, root / f"delta{i}", progress=False)
        for storage in ("sparse", "dense"):
            out[f"pruned{i}", storage] = prune_delta(
                delta, root / f"pruned{i}_{storage}", method="dp", density=0.2, storage=storage, progress=False
            )
            out[f"amp{i}", storage] = amplify_delta(
                delta,
                root / f"amp{i}_{storage}",
                densities=[0.1, 0.2],
                factors=[1.8, 1.2],
                storage=storage,
                progress=False,
            )
    return base, root, out


@pytest.mark.parametrize("kind", ["pruned1", "amp1"])
def test_prune_and_amplify_write_sparse_with_the_dense_content(pruned_pairs, kind):
    _, _, out = pruned_pairs
    sparse_dir, dense_dir = out[kind, "sparse"], out[kind, "dense"]
    manifest, dense_manifest = read_manifest(sparse_dir), read_manifest(dense_dir)
    assert manifest["storage"]["format"] == sparse.FORMAT and manifest["storage"]["version"] == sparse.VERSION
    assert manifest["storage"]["sparse_tensors"] == 14  # the 7 block matrices of each of the two layers
    assert dense_manifest["storage"] == {"format": "dense"}
    assert manifest["content_hash"] == dense_manifest["content_hash"]
    dense = load_file(dense_dir / "model.safetensors")
    decoded = load_delta(sparse_dir)
    assert set(decoded) == set(dense) and all(torch.equal(bits(decoded[n]), bits(dense[n])) for n in dense)
    assert weight_bytes(sparse_dir) < weight_bytes(dense_dir)


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


OUTSIDE = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
    f"model.layers.{i}.{norm}.weight" for i in (0, 1) for norm in ("input_layernorm", "post_attention_layernorm")
}  # the tiny LLaMA's tensors outside the blocks' weight matrices, by hand


def shard_of(folder: Path, names: set[str]) -> Path:
    """The one file of `folder` that holds exactly the tensors `names` (asserted)."""
    found = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            if set(handle.keys()) == names:
                found.append((file, handle.metadata()))
    assert len(found) == 1, f"{folder}: no single file holds exactly {sorted(names)}"
    assert found[0][1] == {"format": "pt", "dppa_shared": "1"}
    return found[0][0]


def test_the_tensors_outside_the_blocks_are_one_file_shared_by_delta_pruned_and_amplified(pruned_pairs):
    _, root, out = pruned_pairs
    delta = load_file(shard_of(root / "delta1", OUTSIDE))
    shared = shard_of(root / "delta1", OUTSIDE).stat()
    for kind in ("pruned1", "amp1"):
        folder = out[kind, "sparse"]
        assert shard_of(folder, OUTSIDE).stat().st_ino == shared.st_ino  # a hard link, not a copy
        assert read_manifest(folder)["storage"]["linked_shards"] == 1
    assert shared.st_nlink == 3
    # amplified: the shared file holds the unscaled delta; read back (dppa's reader, and the independent decoder),
    # it is the delta times the largest factor, float32 arithmetic, as the dense amplified file stores it
    index = json.loads((out["amp1", "sparse"] / "model.safetensors.index.json").read_text())
    assert index["metadata"]["dppa_scale"] == {shard_of(out["amp1", "sparse"], OUTSIDE).name: 1.8}
    reader, decoded = open_checkpoint(out["amp1", "sparse"]), load_delta(out["amp1", "sparse"])
    dense = load_file(out["amp1", "dense"] / "model.safetensors")
    for name in OUTSIDE:
        assert torch.equal(decoded[name], delta[name] * 1.8) and torch.equal(reader.get(name), delta[name] * 1.8)
        assert torch.equal(bits(reader.get(name)), bits(dense[name])), name
    pruned = load_delta(out["pruned1", "sparse"])
    assert all(torch.equal(bits(pruned[n]), bits(delta[n])) for n in OUTSIDE)


def test_a_scope_that_differs_from_the_shared_file_writes_its_own(pruned_pairs, tmp_path):
    _, root, _ = pruned_pairs
    attention = r"^model\.layers\.(?P<layer>\d+)\.self_attn\.[qkvo]_proj\.weight$"
    out = prune_delta(root / "delta1", tmp_path / "p", method="magnitude", density=0.2, scope=attention, progress=False)
    mlp = {f"model.layers.{i}.mlp.{m}_proj.weight" for i in (0, 1) for m in ("gate", "up", "down")}
    own = shard_of(out, OUTSIDE | mlp)  # the MLP matrices are out of this scope: dense, unpruned, in the shared file
    assert own.stat().st_ino != shard_of(root / "delta1", OUTSIDE).stat().st_ino
    assert read_manifest(out)["storage"]["linked_shards"] == 0
    delta, pruned = load_delta(root / "delta1"), load_delta(out)
    assert all(torch.equal(bits(pruned[n]), bits(delta[n])) for n in OUTSIDE | mlp)


def test_a_shared_file_read_scaled_is_not_linked(pruned_pairs, tmp_path):
    """Pruning an amplified delta: its shared file has the right header but reads scaled, so it is written anew."""
    _, _, out = pruned_pairs
    amplified = out["amp1", "sparse"]
    pruned = prune_delta(amplified, tmp_path / "p", method="magnitude", density=0.5, progress=False)
    assert read_manifest(pruned)["storage"]["linked_shards"] == 0
    assert shard_of(pruned, OUTSIDE).stat().st_ino != shard_of(amplified, OUTSIDE).stat().st_ino
    source, got = load_delta(amplified), load_delta(pruned)
    assert all(torch.equal(bits(got[n]), bits(source[n])) for n in OUTSIDE)  # the scaled values, once


def test_an_index_that_scales_an_unshared_file_is_refused(pruned_pairs, tmp_path):
    _, _, out = pruned_pairs
    folder = tmp_path / "amp"
    shutil.copytree(out["amp1", "sparse"], folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != shard_of(folder, OUTSIDE).name)
    index["metadata"]["dppa_scale"] = {other: 1.8}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(DppaError, match=rf"{other}: the index scales it but it is no shared shard"):
        open_checkpoint(folder)


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
@pytest.mark.parametrize("kind", ["pruned", "amp"])
def test_merges_from_sparse_files_are_bit_identical(pruned_pairs, tmp_path, method, kind):
    base, _, out = pruned_pairs
    merged = {
        storage: merge_deltas(
            base,
            [out[f"{kind}1", storage], out[f"{kind}2", storage]],
            tmp_path / storage,
            method=method,
            scale=0.7,
            progress=False,
        )
        for storage in ("sparse", "dense")
    }
    assert read_manifest(merged["sparse"])["content_hash"] == read_manifest(merged["dense"])["content_hash"]
    got = load_file(merged["sparse"] / "model.safetensors")
    assert all(torch.equal(got[n], t) for n, t in load_file(merged["dense"] / "model.safetensors").items())
    if method == "task_arithmetic":  # and both are base + 0.7 (delta1 + delta2) in plain torch
        b = load_file(base / "model.safetensors")
        d1, d2 = load_delta(out[f"{kind}1", "dense"]), load_delta(out[f"{kind}2", "dense"])
        for name, t in b.items():
            torch.testing.assert_close(got[name], t + 0.7 * d1[name] + 0.7 * d2[name], atol=1e-6, rtol=0)


def test_apply_and_in_memory_weights_read_sparse_files(pruned_pairs, tmp_path):
    base, _, out = pruned_pairs
    applied = [apply_delta(base, out["amp1", s], tmp_path / s, progress=False) for s in ("sparse", "dense")]
    assert read_manifest(applied[0])["content_hash"] == read_manifest(applied[1])["content_hash"]
    params = {}
    for storage in ("sparse", "dense"):
        model = AutoModelForCausalLM.from_pretrained(base)
        CandidateWeights(model).add_delta(out["pruned1", storage], 1.0)
        params[storage] = {n: p.detach().clone() for n, p in model.named_parameters()}
    b, d = load_file(base / "model.safetensors"), load_delta(out["pruned1", "dense"])
    for name, value in params["sparse"].items():
        assert torch.equal(value, params["dense"][name]), name
        torch.testing.assert_close(value, b[name] + d[name], atol=1e-6, rtol=0)


def test_cli_storage_flag(pruned_pairs, tmp_path, capsys):
    _, root, _ = pruned_pairs
    args = ["prune", str(root / "delta1"), "--method", "magnitude", "--density", "0.2", "-q"]
    assert dppa([*args, "-o", str(tmp_path / "dense"), "--storage", "dense"]) == 0
    assert json.loads((tmp_path / "dense" / "dppa_manifest.json").read_text())["storage"] == {"format": "dense"}
    assert dppa([*args, "-o", str(tmp_path / "sparse")]) == 0
    assert read_manifest(tmp_path / "sparse")["storage"]["format"] == sparse.FORMAT
    assert "--storage" in dppa_help("prune", capsys) and "--storage" in dppa_help("amplify", capsys)


def dppa_help(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        dppa([command, "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("factor", [1e-3, 0.7, 1.8, 3.3])
def test_a_scaled_read_is_the_float32_product_rounded_with_positive_zeros(dtype, factor):
    gen = torch.Generator().manual_seed(0)
    values = (torch.randn(1 << 16, generator=gen) * torch.logspace(-44, 4, 1 << 16)).to(dtype)  # underflows included
    values[::7] = 0.0
    values = torch.where(values == 0, torch.zeros((), dtype=dtype), values)  # stored zeros are +0.0 (the writers')
    factor32 = torch.tensor(factor, dtype=torch.float32)  # the factor is rounded to float32, the product too
    product = (values.float() * factor32).to(dtype)
    expected = torch.where(product == 0, torch.zeros((), dtype=dtype), product)
    if factor == 1e-3:
        assert bool(torch.signbit(product[product == 0]).any())  # products that underflow to -0.0 are normalised
    assert torch.equal(bits(sparse.scaled(values, factor)), bits(expected))
    assert torch.equal(bits(sparse.scaled(values.clone(), factor, inplace=True)), bits(expected))
    assert torch.equal(bits(sparse.positive_zeros(product)), bits(expected))
