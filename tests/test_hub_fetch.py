"""`dppa fetch` with the real huggingface_hub client against a local hub server (tests/helpers/hub_server.py).

Each fetch runs the real command in a fresh process whose environment points huggingface_hub at the local server
(HF_ENDPOINT, read when huggingface_hub is imported) and allows downloads (HF_HUB_OFFLINE=0, in that process only).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.delta_files import load_delta
from tests.helpers.hub import TOKEN, folder_files, hub_env, sha256
from tests.helpers.hub_server import FakeHub
from tests.helpers.synthetic import make_base, make_finetune, make_lora_adapter

pytestmark = pytest.mark.slow  # a hub server, CLI processes and model folders per test

CHUNK = 10 * 1024 * 1024  # huggingface_hub writes what it receives in chunks of this size


def dppa_fetch(hub_url: str, tmp_path: Path, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dppa", "fetch", *args],
        env=hub_env(hub_url, tmp_path / "hf-home", token),
        capture_output=True,
        text=True,
        timeout=300,
    )


def error_line(done: subprocess.CompletedProcess) -> str:
    """The command's error: exactly one line, exit status 2."""
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("dppa fetch: error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    return errors[0].removeprefix("dppa fetch: error: ")


def manifest(folder: Path) -> dict:
    return json.loads((folder / "dppa_manifest.json").read_text())


def small_repo(seed: int = 0) -> dict[str, bytes]:
    rng = hashlib.sha256(str(seed).encode()).digest()
    return {
        "config.json": json.dumps({"model_type": "llama", "seed": seed}).encode(),
        "tokenizer.json": b'{"version": "1.0"}',
        "model.safetensors": rng * 128,  # 4 KB: fetch does not parse weights
        "README.md": b"# a model card: not a model file",
    }


def test_a_branch_is_resolved_to_its_commit_and_a_pinned_commit_is_exactly_that(tmp_path):
    with FakeHub() as hub:
        first = hub.commit("org/model", small_repo(1))
        head = hub.commit("org/model", small_repo(2))  # main moves on
        done = dppa_fetch(hub.url, tmp_path, "org/model", "--revision", "main", "-o", str(tmp_path / "main"))
        assert done.returncode == 0, done.stderr
        assert f"org/model@main = commit {head}" in done.stdout
        record = manifest(tmp_path / "main")
        assert (record["hub_id"], record["revision"], record["resolved_commit"]) == ("org/model", "main", head)
        wanted = {k: v for k, v in small_repo(2).items() if k != "README.md"}  # weights, config, tokenizer only
        assert {k: v for k, v in folder_files(tmp_path / "main").items() if k != "dppa_manifest.json"} == wanted
        assert {f["name"]: f["sha256"] for f in record["files"]} == {k: sha256(v) for k, v in wanted.items()}
        # the files were downloaded at the resolved commit, never at the branch name
        downloads = hub.requests(contains="/resolve/")
        assert downloads and all(f"/resolve/{head}/" in r.path for r in downloads)

        hub.seen.clear()
        done = dppa_fetch(hub.url, tmp_path, "org/model", "--revision", first, "-o", str(tmp_path / "pinned"))
        assert done.returncode == 0, done.stderr
        assert manifest(tmp_path / "pinned")["resolved_commit"] == first
        assert folder_files(tmp_path / "pinned")["config.json"] == small_repo(1)["config.json"]
        assert not hub.requests(contains="/revision/main")


def test_the_resolved_commit_reaches_the_delta_manifest(tmp_path):
    """What extract writes names the hub commits of its inputs."""
    base = make_base(tmp_path / "local/base")
    finetune = make_finetune(base, tmp_path / "local/ft", seed=1)
    with FakeHub() as hub:
        base_sha = hub.commit("org/base", folder_files(base))
        ft_sha = hub.commit("org/ft", folder_files(finetune), branch="v1")
        for repo, rev, out in (("org/base", "main", "base"), ("org/ft", "v1", "ft")):
            done = dppa_fetch(hub.url, tmp_path, repo, "--revision", rev, "-o", str(tmp_path / out))
            assert done.returncode == 0, done.stderr
    delta = tmp_path / "delta"
    subprocess.run(
        [sys.executable, "-m", "dppa", "extract", str(tmp_path / "base"), str(tmp_path / "ft"), "-o", str(delta), "-q"],
        check=True,
        capture_output=True,
    )
    inputs = manifest(delta)
    assert (inputs["base"]["hub_id"], inputs["base"]["resolved_commit"]) == ("org/base", base_sha)
    assert (inputs["finetuned"]["revision"], inputs["finetuned"]["resolved_commit"]) == ("v1", ft_sha)


def test_a_pickle_only_repository_is_refused_unless_asked(tmp_path):
    pickled = {"config.json": b"{}", "pytorch_model.bin": b"\x80\x04pickle" * 64}
    with FakeHub() as hub:
        hub.commit("org/old", pickled)
        hub.commit("org/both", {**pickled, "model.safetensors": b"s" * 512})
        refused = dppa_fetch(hub.url, tmp_path, "org/old", "--revision", "main", "-o", str(tmp_path / "old"))
        line = error_line(refused)
        assert line.startswith("org/old: only pickled weights") and "--allow-pickle" in line
        assert not (tmp_path / "old").exists()
        assert not hub.requests(contains="/resolve/")  # nothing was downloaded

        allowed = dppa_fetch(
            hub.url, tmp_path, "org/old", "--revision", "main", "-o", str(tmp_path / "old"), "--allow-pickle"
        )
        assert allowed.returncode == 0, allowed.stderr
        assert folder_files(tmp_path / "old")["pytorch_model.bin"] == pickled["pytorch_model.bin"]
        assert manifest(tmp_path / "old")["allow_pickle"] is True

        # where safetensors exist, the pickles are not downloaded even when allowed
        both = dppa_fetch(
            hub.url, tmp_path, "org/both", "--revision", "main", "-o", str(tmp_path / "both"), "--allow-pickle"
        )
        assert both.returncode == 0, both.stderr
        assert set(folder_files(tmp_path / "both")) == {"config.json", "model.safetensors", "dppa_manifest.json"}


def test_a_dropped_connection_resumes_with_a_range_request(tmp_path):
    weights = os.urandom(CHUNK + CHUNK // 4)  # over one chunk: huggingface_hub keeps whole chunks it received
    cut = CHUNK + CHUNK // 10
    with FakeHub() as hub:
        hub.commit("org/big", {"config.json": b"{}", "model.safetensors": weights})
        hub.cut_after["model.safetensors"] = cut
        done = dppa_fetch(hub.url, tmp_path, "org/big", "--revision", "main", "-o", str(tmp_path / "big"))
        assert done.returncode == 0, done.stderr
        gets = hub.requests("GET", "/cdn/")
        assert [r.range is None for r in gets] == [True, False]
        resumed_at = int(gets[1].range.removeprefix("bytes=").removesuffix("-"))
        assert 0 < resumed_at <= cut
        # the second request served only the rest: the file was not downloaded twice
        assert hub.bytes_served["model.safetensors"] == cut + len(weights) - resumed_at < 2 * len(weights)
    assert sha256((tmp_path / "big/model.safetensors").read_bytes()) == sha256(weights)


def test_a_killed_download_leaves_no_output_and_the_rerun_downloads_only_what_is_missing(tmp_path):
    files = {
        "config.json": b'{"model_type": "llama"}',
        "model.safetensors.index.json": b'{"weight_map": {}}',
        "model-00001-of-00002.safetensors": b"a" * 4096,
        "model-00002-of-00002.safetensors": b"b" * 4096,
    }
    out = tmp_path / "model"
    with FakeHub() as hub:
        commit = hub.commit("org/sharded", files)
        release = hub.hold["model-00002-of-00002.safetensors"] = threading.Event()
        process = subprocess.Popen(
            [sys.executable, "-m", "dppa", "fetch", "org/sharded", "--revision", "main", "-o", str(out)],
            env=hub_env(hub.url, tmp_path / "hf-home"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            staging = tmp_path / f".model.download-{commit[:12]}"
            # huggingface_hub records each finished file in local_dir/.cache/huggingface/download/NAME.metadata
            done_marks = [
                staging / f".cache/huggingface/download/{name}.metadata" for name in files if "00002" not in name
            ]
            deadline = time.monotonic() + 120
            while not (hub.holding.is_set() and all(m.exists() for m in done_marks)):
                assert time.monotonic() < deadline and process.poll() is None, "the download did not get under way"
                time.sleep(0.1)
            process.kill()  # mid-file, as a power cut or OOM kill would
            process.wait(timeout=30)
        finally:
            release.set()
            if process.poll() is None:
                process.kill()
        assert not out.exists()  # no half-written model folder
        assert staging.is_dir()

        done = dppa_fetch(hub.url, tmp_path, "org/sharded", "--revision", "main", "-o", str(out))
        assert done.returncode == 0, done.stderr
        assert {k: v for k, v in folder_files(out).items() if k != "dppa_manifest.json"} == files
        assert not staging.exists()
        # each finished file was downloaded once over both runs; the killed one twice
        gets = {name: len([r for r in hub.requests("GET") if r.path.endswith(name)]) for name in files}
        cdn = {n: len(hub.requests("GET", f"/cdn/{sha256(files[n])}")) for n in files if n.endswith(".safetensors")}
        assert gets["config.json"] == gets["model.safetensors.index.json"] == 1
        assert cdn == {"model-00001-of-00002.safetensors": 1, "model-00002-of-00002.safetensors": 2}


def test_a_corrupted_download_is_refused_and_the_rerun_downloads_it_anew(tmp_path):
    files = {"config.json": b"{}", "model.safetensors": b"w" * 2048}
    with FakeHub() as hub:
        hub.commit("org/model", files)
        hub.corrupt.add("model.safetensors")
        done = dppa_fetch(hub.url, tmp_path, "org/model", "--revision", "main", "-o", str(tmp_path / "m"))
        assert error_line(done) == (
            "org/model@main: model.safetensors does not match the hub's size or hash (a corrupted download); "
            "run again to download it anew"
        )
        assert not (tmp_path / "m").exists()
        again = dppa_fetch(hub.url, tmp_path, "org/model", "--revision", "main", "-o", str(tmp_path / "m"))
        assert again.returncode == 0, again.stderr
        assert (tmp_path / "m/model.safetensors").read_bytes() == files["model.safetensors"]
        assert len(hub.requests("GET", "/cdn/")) == 2 and len(hub.requests("GET", "config.json")) == 1


def test_the_token_is_sent_to_the_hub_and_written_nowhere(tmp_path):
    with FakeHub(token=TOKEN) as hub:
        commit = hub.commit("org/private", small_repo(3), private=True)
        done = dppa_fetch(
            hub.url, tmp_path, "org/private", "--revision", "main", "-o", str(tmp_path / "m"), token=TOKEN
        )
        assert done.returncode == 0, done.stderr
        assert manifest(tmp_path / "m")["resolved_commit"] == commit
        api = hub.requests(contains="/api/models/") + hub.requests(contains="/resolve/")
        assert api and all(r.authorization == f"Bearer {TOKEN}" for r in api)
        assert all(r.authorization is None for r in hub.requests(contains="/cdn/"))  # not sent off the hub

        without = dppa_fetch(hub.url, tmp_path, "org/private", "--revision", "main", "-o", str(tmp_path / "n"))
        assert error_line(without) == (
            f"org/private@main: no such repository on {hub.url}, or it is private "
            "(set HF_TOKEN to a token that may read it)"
        )
        wrong = dppa_fetch(
            hub.url, tmp_path, "org/private", "--revision", "main", "-o", str(tmp_path / "n"), token="hf_wrong"
        )
        assert error_line(wrong) == "org/private@main: the hub refused the token (401); check HF_TOKEN"
        assert not (tmp_path / "n").exists()
    for output in (done, without, wrong):
        assert TOKEN not in output.stdout + output.stderr and "hf_wrong" not in output.stdout + output.stderr
    for path in tmp_path.rglob("*"):  # the model folder, the manifest, huggingface_hub's home and caches
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path


def test_unknown_repository_or_revision_is_one_line(tmp_path):
    with FakeHub(token=TOKEN) as hub:
        hub.commit("org/model", small_repo())
        revision = dppa_fetch(hub.url, tmp_path, "org/model", "--revision", "nope", "-o", str(tmp_path / "a"))
        assert error_line(revision) == "org/model@nope: no such revision; give an existing branch, tag or commit sha"
        repo = dppa_fetch(
            hub.url, tmp_path, "org/missing", "--revision", "main", "-o", str(tmp_path / "b"), token=TOKEN
        )
        assert (
            error_line(repo) == f"org/missing@main: no such repository on {hub.url}, or it is private (check HF_TOKEN)"
        )
        assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_no_network_is_one_line_and_writes_nothing(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    done = dppa_fetch(closed, tmp_path, "org/model", "--revision", "main", "-o", str(tmp_path / "m"))
    line = error_line(done)
    assert line.startswith(f"org/model@main: cannot reach the hub at {closed} (ConnectError); check the network")
    assert not (tmp_path / "m").exists()


def test_an_existing_output_is_refused_before_any_download(tmp_path):
    (tmp_path / "m").mkdir()
    with FakeHub() as hub:
        hub.commit("org/model", small_repo())
        done = dppa_fetch(hub.url, tmp_path, "org/model", "--revision", "main", "-o", str(tmp_path / "m"))
        assert "output folder already exists" in error_line(done)
        assert not hub.requests(contains="/models/org/model")


def test_help_teaches_revisions_pickles_tokens_and_pipelines():
    done = subprocess.run([sys.executable, "-m", "dppa", "fetch", "--help"], capture_output=True, text=True, check=True)
    for words in ("resolved_commit", "--allow-pickle", "HF_TOKEN", "dppa serve", "a pinned commit"):
        assert words in done.stdout


def test_only_followed_branches_are_asked_about(tmp_path):
    """A pinned commit, a zoo model, a record params.yaml no longer asks for, or nothing fetched yet: no question
    to the hub; a branch params.yaml asks for: one."""
    from dppa.pipeline.hub import followed_revision, write_record

    sha = "0123456789abcdef0123456789abcdef01234567"
    records = {
        "pinned": {"kind": "hub", "source": "org/a", "revision": sha, "commit": sha},
        "zoo": {"kind": "zoo", "source": "zoo:arith", "path": "data/models/zoo/arith"},
        "replaced": {"kind": "hub", "source": "org/old", "revision": "main", "commit": sha},
        "followed": {"kind": "hub", "source": "org/new", "revision": "main", "commit": sha},
    }
    for name, record in records.items():
        (tmp_path / name).mkdir()
        write_record(tmp_path / name, record)
    wanted = {("org/a", sha), ("org/new", "main")}
    asked = {name: followed_revision(tmp_path / name, wanted) for name in (*records, "never-fetched")}
    assert asked == {
        "pinned": None,
        "zoo": None,
        "replaced": None,
        "followed": records["followed"],
        "never-fetched": None,
    }


def test_hub_calls_are_retried_on_network_failures_not_on_the_hubs_refusals(capsys):
    from dppa.errors import DppaError
    from dppa.pipeline.hub import HubRefusal
    from dppa.stages.common import retried

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise DppaError("org/m@main: cannot reach the hub")
        return "done"

    assert retried(flaky, "fetch org/m", delays_s=(0, 0, 0)) == "done" and len(calls) == 3
    assert capsys.readouterr().err.count("cannot reach the hub (trying again in 0 s)") == 2

    def refused():
        calls.append(1)
        raise HubRefusal("org/m@nope: no such revision")

    calls.clear()
    with pytest.raises(HubRefusal):
        retried(refused, "fetch org/m", delays_s=(0, 0, 0))
    assert len(calls) == 1

    def always_down():
        calls.append(1)
        raise DppaError("org/m@main: cannot reach the hub")

    calls.clear()
    with pytest.raises(DppaError, match="cannot reach"):
        retried(always_down, "fetch org/m", delays_s=(0, 0))
    assert len(calls) == 3  # the first try and one per delay, then the last error


def test_a_repository_holding_a_lora_adapter_is_fetched_and_extracted(tmp_path):
    """A hub repo with only adapter_config.json + adapter_model.safetensors is a fine-tune: fetched, then extracted
    into base + scaling x B @ A (computed here by hand)."""
    from safetensors.torch import load_file

    base = make_base(tmp_path / "local/base")
    modules = {"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.1.mlp.up_proj": (64, 32)}
    adapter = make_lora_adapter(tmp_path / "local/adapter", seed=3, modules=modules, r=4, alpha=8)
    with FakeHub() as hub:
        sha = hub.commit("org/lora", folder_files(adapter))
        done = dppa_fetch(hub.url, tmp_path, "org/lora", "--revision", "main", "-o", str(tmp_path / "lora"))
        assert done.returncode == 0, done.stderr
    assert manifest(tmp_path / "lora")["resolved_commit"] == sha
    delta = tmp_path / "delta"
    subprocess.run(
        [sys.executable, "-m", "dppa", "extract", str(base), str(tmp_path / "lora"), "-o", str(delta), "-q"],
        check=True,
        capture_output=True,
    )
    record = manifest(delta)["finetuned"]
    assert (record["resolved_commit"], record["adapter"]["base_model_name_or_path"]) == (sha, "org/base")
    weights, factors = load_file(base / "model.safetensors"), load_file(adapter / "adapter_model.safetensors")
    got = load_delta(delta)
    for name, w in weights.items():
        module = name.removesuffix(".weight")
        if module in modules:
            a = factors[f"base_model.model.{module}.lora_A.weight"]
            b = factors[f"base_model.model.{module}.lora_B.weight"]
            want = (w + (b @ a) * 2.0) - w  # scaling = alpha / r = 2; the fine-tune rounded to float32 first
            assert got[name].abs().max() > 0 and torch.equal(got[name], want), name
        else:
            assert not got[name].any(), name
