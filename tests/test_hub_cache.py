"""Hub models stay in the models cache: the fetch record (the DVC output) holds no weights, and the later stages
find the pinned commit's snapshot through huggingface_hub itself (offline here, from a cache laid out as the hub
writes it)."""

from __future__ import annotations

import shutil

import pytest

from dppa.errors import DppaError
from dppa.pipeline.hub import MODELS_DIR_ENV, model_folder, write_record

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_record(folder, commit=COMMIT):
    folder.mkdir()
    record = {"kind": "hub", "source": "org/tiny", "revision": "main", "commit": commit, "patterns": ["*"]}
    write_record(folder, record)
    return folder


def test_a_hub_record_resolves_to_the_snapshot_in_the_models_cache(tiny_models, tmp_path, monkeypatch):
    cache = tmp_path / "models"
    snapshot = cache / "models--org--tiny" / "snapshots" / COMMIT
    shutil.copytree(tiny_models[0], snapshot)
    monkeypatch.setenv(MODELS_DIR_ENV, str(cache))
    fetched = hub_record(tmp_path / "fetched")
    assert sorted(p.name for p in fetched.iterdir()) == ["dppa_fetch.json"]  # no weights in the DVC output
    assert model_folder(fetched) == snapshot


def test_a_commit_missing_offline_names_the_models_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(MODELS_DIR_ENV, str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fetched = hub_record(tmp_path / "fetched", commit="f" * 40)
    with pytest.raises(DppaError, match=rf"org/tiny@f{{40}}: not in {tmp_path / 'models'}.*{MODELS_DIR_ENV}"):
        model_folder(fetched)
