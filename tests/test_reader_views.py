"""`CheckpointReader.bits_view`: the in-place views `dppa merge` reads bf16 chunks through hold the bytes that
`read_flat` reads, for any range; tensors it cannot view in place are left to `read_flat`."""

import torch
from safetensors.torch import save_file

from dppa.io import reader as reader_module
from dppa.io.reader import open_checkpoint


def write(folder, tensors):
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return open_checkpoint(folder)


def test_views_hold_the_bytes_read_flat_reads(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        f"t{i}": torch.randn(shape, generator=gen).to(dtype)
        for i, (shape, dtype) in enumerate(
            [((3, 5), torch.bfloat16), ((1000, 70), torch.bfloat16), ((7,), torch.float16), ((4099,), torch.bfloat16)]
        )
    }
    reader = write(tmp_path / "m", tensors)
    for name, tensor in tensors.items():
        n = tensor.numel()
        for start, count in [(0, n), (1, n - 1), (n // 3, n // 3), (n - 1, 1), (5, 0)]:
            view = reader.bits_view(name, start, count)
            expected = tensor.reshape(-1)[start : start + count].view(torch.int16)
            assert view is not None and not view.flags.writeable
            assert torch.equal(torch.from_numpy(view.copy()), expected), (name, start, count)
            assert torch.equal(reader.read_flat(name, start, count).view(torch.int16), expected)


def test_other_tensors_are_not_viewed_and_few_stay_mapped(tmp_path):
    tensors = {f"b{i}": torch.full((300,), float(i)).bfloat16() for i in range(10)}
    reader = write(tmp_path / "m", {**tensors, "f32": torch.ones(4), "empty": torch.zeros(0).bfloat16()})
    assert reader.bits_view("f32", 0, 4) is None  # 4-byte elements
    assert reader.bits_view("empty", 0, 0) is None
    views = [reader.bits_view(name, 0, 300) for name in tensors]
    assert len(reader._maps) == reader_module.MAPPED_TENSORS  # older tensors unmapped once their views go
    for i, view in enumerate(views):  # the views of unmapped tensors still hold their bytes
        assert torch.equal(torch.from_numpy(view.copy()).view(torch.bfloat16), tensors[f"b{i}"])
    reader.close()
    assert torch.equal(torch.from_numpy(views[-1].copy()).view(torch.bfloat16), tensors["b9"])
