"""The safetensors container format: an 8-byte little-endian header length, a JSON header, then raw tensor bytes.

We parse and write it ourselves (it is tiny) so that reading is one `readinto` per tensor or chunk into memory we own:
no memory map whose touched pages would stay resident while a 100 GB checkpoint streams through.
"""

from __future__ import annotations

import json
import math
import struct

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
HEADER_ALIGN = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024


class FormatError(ValueError):
    """The bytes are not a valid safetensors file (message says why, without the path)."""


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def parse_header(head: bytes, file_size: int) -> tuple[dict, dict, int]:
    """Return (tensors, metadata, data_start); `head` holds at least the first 8 + header-length bytes."""
    if len(head) < 8:
        raise FormatError(f"file is {file_size} bytes, too short for a safetensors header")
    (length,) = struct.unpack("<Q", head[:8])
    if length > MAX_HEADER_BYTES or 8 + length > file_size:
        raise FormatError(
            f"header length {length} does not fit the file ({file_size} bytes); the file is corrupt or truncated"
        )
    try:
        header = json.loads(head[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"header is not valid JSON ({exc.__class__.__name__}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise FormatError("header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + length
    data_size = file_size - data_start
    tensors = {}
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"tensor {name!r} has a malformed header entry; the file is corrupt") from None
        expected = math.prod(shape) * itemsize(dtype)
        if end - begin != expected or begin < 0:
            raise FormatError(
                f"tensor {name!r} spans {end - begin} bytes but its shape needs {expected}; the file is corrupt"
            )
        if end > data_size:
            raise FormatError(
                f"tensor {name!r} ends at byte {data_start + end} but the file has {file_size} bytes; "
                "the file is truncated (re-download or re-create it)"
            )
        tensors[name] = (dtype, shape, data_start + begin)
    return tensors, metadata, data_start


def build_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict | None = None) -> bytes:
    """Header bytes (length prefix included) for tensors laid out back to back in the given order."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * itemsize(dtype)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % HEADER_ALIGN)
    return struct.pack("<Q", len(body)) + body
