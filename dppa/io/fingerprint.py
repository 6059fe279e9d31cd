"""A base checkpoint's fingerprint: cheap to compute, recorded in every delta, compared before a merge starts.

The full content hash needs every byte of the base; on a 7B model that is a minute of reading. The fingerprint hashes
each tensor's name, dtype and shape and its first and last FINGERPRINT_ELEMS elements, a few KiB per tensor: enough to
tell apart two bases of the same architecture (every fine-tune and every re-training moves those entries), while the
full content hash, computed anyway as a merge reads the base, is compared before the output is renamed into place.
"""

from __future__ import annotations

import hashlib

from dppa.io.content_hash import tensor_bytes
from dppa.io.reader import CheckpointReader

FINGERPRINT_ELEMS = 512


def base_fingerprint(reader: CheckpointReader) -> str:
    digest = hashlib.sha256()
    for name in sorted(reader.names()):
        n = reader.numel(name)
        digest.update(f"{name}|{reader.dtype(name)}|{tuple(reader.shape(name))};".encode())
        head = min(n, FINGERPRINT_ELEMS)
        digest.update(tensor_bytes(reader.read_flat(name, 0, head)))
        if n > head:
            tail = min(n - head, FINGERPRINT_ELEMS)
            digest.update(tensor_bytes(reader.read_flat(name, n - tail, tail)))
    return "fp1:" + digest.hexdigest()
