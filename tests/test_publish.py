"""`dppa publish` with the real huggingface_hub upload API against the local hub server (tests/helpers/hub_server.py).

Each publish runs the real command in a fresh process pointed at the local server (HF_ENDPOINT), with LFS uploads
(HF_HUB_DISABLE_XET=1: the local hub has no Xet storage) and the token in HF_TOKEN.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from tests.helpers.hub_server import FakeHub
from tests.helpers.synthetic import make_base, make_finetune

TOKEN = "hf_WriterSecretToken0123456789abcd"
OTHER = "hf_OtherUserToken0123456789abcdef"


def publish(hub: FakeHub, home: Path, *args, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    env = {
        **{k: v for k, v in __import__("os").environ.items() if k != "HF_TOKEN"},
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_XET": "1",
    }
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "dppa", "publish", *map(str, args)], env=env, capture_output=True, text=True, timeout=300
    )


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("dppa publish: error: ")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("publish")
    base = make_base(root / "base")
    ft = make_finetune(base, root / "ft", seed=1)
    subprocess.run(
        [sys.executable, "-m", "dppa", "merge", base, ft, "-o", root / "merged", "--density", "0.5", "-q"], check=True
    )
    return root / "merged"


@pytest.mark.slow
def test_publish_uploads_once_then_nothing_and_the_gate_refuses_worse(merged, tmp_path):
    with FakeHub(token=TOKEN) as hub:
        done = publish(hub, tmp_path, merged, "--repo", "me/merge", "--score", "0.9", "--record", tmp_path / "p.json")
        assert done.returncode == 0, done.stderr
        record = json.loads((tmp_path / "p.json").read_text())
        assert record["published"] and record["commit"] == hub.repos["me/merge"].refs["main"]
        files = hub.repos["me/merge"].commits[record["commit"]]
        for name in ("model.safetensors", "config.json", "dppa_manifest.json", "dppa_recipe.yaml"):
            assert files[name] == (merged / name).read_bytes(), name
        card = ModelCard(files["README.md"].decode())
        assert card.data.dppa_score == 0.9 and card.data.tags == ["merge", "dppa", "ties"]
        manifest = json.loads((merged / "dppa_manifest.json").read_text())
        assert card.data.dppa_content_hash == manifest["content_hash"]
        assert hub.requests("PUT", "/lfs-upload/")  # the weights went by LFS
        assert all(TOKEN not in out for out in (done.stdout, done.stderr, (tmp_path / "p.json").read_text()))

        commits = len(hub.repos["me/merge"].commits)
        again = publish(hub, tmp_path, merged, "--repo", "me/merge", "--score", "0.9")
        assert again.returncode == 0 and "unchanged" in again.stdout, again.stderr
        assert len(hub.repos["me/merge"].commits) == commits  # nothing changed: no new commit

        worse = publish(hub, tmp_path, merged, "--repo", "me/merge", "--score", "0.8", "--fail-if-refused")
        assert worse.returncode == 3 and "refused by the gate: score 0.8000 is below the published 0.9" in worse.stdout
        low = publish(hub, tmp_path, merged, "--repo", "me/merge", "--score", "0.95", "--min-score", "0.96")
        assert low.returncode == 0 and "below gate.min_score 0.96" in low.stdout
        assert len(hub.repos["me/merge"].commits) == commits

        branch = publish(hub, tmp_path, merged, "--repo", "me/merge", "--revision", "nightly", "--score", "0.91")
        assert branch.returncode == 0, branch.stderr
        assert hub.repos["me/merge"].refs["nightly"] != hub.repos["me/merge"].refs["main"]


@pytest.mark.slow
def test_refused_tokens_are_one_line(merged, tmp_path):
    with FakeHub(token=TOKEN, readonly_token=OTHER) as hub:
        hub.commit("someone/else", {"README.md": b"# theirs\n"})
        line = one_error_line(publish(hub, tmp_path, merged, "--repo", "me/merge", token="hf_NotAValidToken0000000000"))
        assert "me/merge@main: the hub refused the token (401)" in line
        line = one_error_line(publish(hub, tmp_path, merged, "--repo", "someone/else", token=OTHER))
        assert "someone/else@main: the token may not write to this repository (403)" in line
        assert OTHER not in line


@pytest.mark.slow
def test_a_connection_cut_mid_upload_commits_nothing_and_a_rerun_completes(merged, tmp_path):
    with FakeHub(token=TOKEN) as hub:
        hub.cut_upload = 1  # one cut: huggingface_hub's own retry sends the file again, and the publish succeeds
        once = publish(hub, tmp_path, merged, "--repo", "me/once", "--score", "0.9")
        assert once.returncode == 0 and "published" in once.stdout and len(hub.requests("PUT", "/lfs-upload/")) == 2
    with FakeHub(token=TOKEN) as hub:
        hub.cut_upload = 100  # the connection keeps dropping: every retry fails
        cut = publish(hub, tmp_path, merged, "--repo", "me/merge", "--score", "0.9")
        line = one_error_line(cut)
        assert "the connection to" in line and "run again" in line
        assert list(hub.repos["me/merge"].commits[hub.repos["me/merge"].refs["main"]]) == [".gitattributes"]
        hub.cut_upload = 0
        done = publish(hub, tmp_path, merged, "--repo", "me/merge", "--score", "0.9")
        assert done.returncode == 0 and "published" in done.stdout, done.stderr
        head = hub.repos["me/merge"].refs["main"]
        assert hub.repos["me/merge"].commits[head]["model.safetensors"] == (merged / "model.safetensors").read_bytes()
