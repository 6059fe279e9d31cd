"""Helpers for the tests against the local hub server (tests/helpers/hub_server.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

TOKEN = "hf_TestSecretToken0123456789abcdef"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def hub_env(hub_url: str, home: Path, token: str | None = None) -> dict[str, str]:
    env = dict(os.environ, HF_ENDPOINT=hub_url, HF_HUB_OFFLINE="0", HF_HOME=str(home))
    env.pop("HF_TOKEN", None)
    if token is not None:
        env["HF_TOKEN"] = token
    return env
