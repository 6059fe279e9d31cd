"""The demo zoo: its domains, tokenizer, determinism and the model folders it writes."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dppa.cli import main
from dppa.errors import DppaError
from dppa.zoo.build import build_zoo, read_manifest
from dppa.zoo.domains import DOMAINS, FACT_TABLE, SPLITS, domain_splits
from dppa.zoo.training import encode_examples, lr_at

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_splits_are_disjoint_and_answers_right(domain):
    splits = domain_splits(domain)
    prompts = {s: {e.prompt for e in splits[s]} for s in SPLITS}
    assert all(len(prompts[s]) == len(splits[s]) > 0 for s in SPLITS)
    assert not (prompts["train"] & prompts["validation"] or prompts["train"] & prompts["test"])
    assert not prompts["validation"] & prompts["test"]
    for example in splits["test"][:50]:
        assert example.completion.strip() == example.answer
        if domain == "arith":
            a, b = example.prompt.removesuffix("=").split("+")
            assert int(example.answer) == int(a) + int(b)
        elif domain == "strings":
            letters = example.prompt.removeprefix("reverse ").removesuffix(" =").split()
            assert example.answer.split() == letters[::-1]
        else:
            names = example.prompt.removeprefix("colour of ").removesuffix(" =").split()
            assert example.answer.split() == [FACT_TABLE[n] for n in names]


def test_splits_are_a_fixed_benchmark():
    assert domain_splits("arith")["test"][:3] == domain_splits("arith")["test"][:3]
    assert domain_splits("facts")["validation"][0] != domain_splits("facts")["test"][0]


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 100, 1.0) for s in range(100)]
    assert lrs[0] < lrs[4] == pytest.approx(1.0)
    assert lrs[-1] < 0.2 and min(lrs) >= 0.1 - 1e-9
    held = [lr_at(s, 240, 6e-4, "constant", 0.1) for s in range(240)]
    assert held[0] == pytest.approx(6e-4 / 24) and held[23:] == [6e-4] * (240 - 23)  # 24 warm-up steps, then 6e-4


@pytest.mark.slow
def test_zoo_layout_and_models_load_offline(tiny_zoo):
    manifest = read_manifest(tiny_zoo)
    assert set(manifest["domains"]) == set(DOMAINS)
    tok = AutoTokenizer.from_pretrained(tiny_zoo / "base")
    base = AutoModelForCausalLM.from_pretrained(tiny_zoo / "base")
    assert base.config.model_type == "llama"
    for domain in DOMAINS:
        folder = tiny_zoo / domain
        assert (folder / "model.safetensors").is_file()
        assert (folder / "tokenizer.json").read_bytes() == (tiny_zoo / "base" / "tokenizer.json").read_bytes()
        model = AutoModelForCausalLM.from_pretrained(folder)
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, base.get_parameter(n))]
        assert len(changed) == len(list(model.parameters()))  # full fine-tuning moved every tensor
        assert manifest["domains"][domain]["relative_delta"] > 0
    # Digits are single tokens and a prompt tokenizes as a prefix of its training text.
    assert tok.tokenize("123+456=") == ["1", "2", "3", "+", "4", "5", "6", "="]
    encoded = encode_examples(tok, domain_splits("facts")["train"][:5])
    assert all(0 < prompt_len < len(ids) for ids, prompt_len in encoded)


def _file_hashes(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file() and p.name != "zoo.json"
    }


def _manifest_without_timing(folder):
    manifest = read_manifest(folder)
    del manifest["timing"]
    return manifest


@pytest.mark.slow
def test_build_is_deterministic(tiny_zoo, tmp_path):
    again = tmp_path / "again"
    build_zoo(again, size="tiny", regime="heavy", seed=0, workers=1, log=lambda _msg: None)  # fixture: parallel
    assert _file_hashes(again) == _file_hashes(tiny_zoo)
    # The manifest too, scores included; only its timings differ between runs.
    assert _manifest_without_timing(again) == _manifest_without_timing(tiny_zoo)


def test_pretraining_gives_the_same_weights_on_one_thread_and_on_two():
    # dppa.zoo.training.deterministic: pre-training uses the cores because the thread count does not change the bits.
    from dppa.zoo.corpus import pretraining_text
    from dppa.zoo.model import SIZES, build_model
    from dppa.zoo.tokenizer import train_tokenizer
    from dppa.zoo.training import pretrain

    spec = SIZES["tiny"]
    texts = pretraining_text(0, 400, spec.skill_share)
    tokenizer = train_tokenizer(texts, spec.vocab)
    weights = []
    for threads in (1, 2):
        model = build_model(spec, tokenizer, seed=0)
        pretrain(model, tokenizer, texts, steps=8, batch=8, seq=32, lr=3e-3, seed=0, log=lambda _m: None,
                 threads=threads)  # fmt: skip
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(
        weights[0]["model.embed_tokens.weight"], build_model(spec, tokenizer, 0).model.embed_tokens.weight
    )


@pytest.mark.slow
def test_light_regime_drifts_less_than_heavy(tiny_zoo, tmp_path, capsys):
    assert main(["zoo", str(tmp_path / "light"), "--size", "tiny", "--regime", "light"]) == 0
    assert "mean|delta|/mean|base|" in capsys.readouterr().out
    light, heavy = read_manifest(tmp_path / "light"), read_manifest(tiny_zoo)
    for domain in DOMAINS:
        assert heavy["domains"][domain]["relative_delta"] > 5 * light["domains"][domain]["relative_delta"]


def test_existing_output_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "zoo"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    with pytest.raises(DppaError, match="--overwrite"):
        build_zoo(out, size="tiny")
    assert main(["zoo", str(out), "--size", "tiny"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user file"


def test_unknown_size_is_a_user_error(tmp_path):
    with pytest.raises(DppaError, match="size"):
        build_zoo(tmp_path / "zoo", size="huge")


@pytest.mark.slow  # the tiny zoo (about a minute to build)
def test_manifest_is_json_with_regime(tiny_zoo):
    manifest = json.loads((tiny_zoo / "zoo.json").read_text())
    assert manifest["regime"]["name"] == "heavy" and manifest["size"] == "tiny"


@pytest.mark.slow  # the tiny zoo (about a minute to build)
def test_manifest_records_scores_deltas_and_build_time(tiny_zoo):
    manifest = read_manifest(tiny_zoo)
    assert manifest["eval"] == {"split": "test", "limit": 40, "metric": "exact_match"}
    # the CPU kernels that rounded its float32 (this machine's: the fixture built it here)
    assert manifest["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()
    assert set(manifest["base"]["exact_match"]) == {f"zoo_{d}" for d in DOMAINS}
    for domain, entry in manifest["domains"].items():
        assert entry["task"] == f"zoo_{domain}"
        # Exact match over 40 examples is a multiple of 1/40.
        assert 0 <= entry["exact_match"] <= 1 and round(entry["exact_match"] * 40, 6).is_integer()
        assert entry["base_exact_match"] == manifest["base"]["exact_match"][entry["task"]]
        assert 0 < entry["relative_delta_linear"] and 0 < entry["relative_delta"]
        assert manifest["timing"][domain]["finetune_seconds"] > 0
    timing = manifest["timing"]
    assert 0 < timing["base_seconds"] < timing["build_seconds"]


@pytest.mark.slow  # the tiny zoo
def test_a_build_records_the_targets_it_missed(tiny_zoo):
    # The tiny zoo is too small to learn every domain. The heavy regime's targets of scripts/check_zoo.py, by hand:
    # base <= 0.2 and fine-tune >= 0.8 exact match, mean|delta|/mean|base| of the linear weights >= 0.2.
    manifest = read_manifest(tiny_zoo)
    domains = manifest["domains"]
    weak = sorted(d for d, e in domains.items() if e["exact_match"] < 0.8)
    expected = (
        [t for t, score in manifest["base"]["exact_match"].items() if score > 0.2]
        + weak
        + [d for d, e in domains.items() if e["relative_delta_linear"] < 0.2]
    )
    assert weak, "the tiny zoo learns every domain now: this test needs a zoo that misses a target"
    missed = manifest["targets_missed"]
    assert len(missed) == len(expected)
    for domain in weak:
        score = f"{domain} scores {domains[domain]['exact_match']:.3f}"
        assert any(line.startswith(score) and "(target >= 0.8)" in line for line in missed), (score, missed)


def test_a_zoo_from_the_cache_says_which_targets_it_missed(tmp_path, monkeypatch, capsys):
    # The build logs its misses once; a later run served from the cache must say them again.
    from dppa.pipeline.config import load_params
    from dppa.stages.models import zoo
    from dppa.zoo.cache import CACHE_ENV, zoo_key

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    entry = tmp_path / "cache" / zoo_key("tiny", "heavy", 0)
    entry.mkdir(parents=True)
    line = "arith gains 0.022 over the base on zoo_arith (target >= 0.3)"
    (entry / "zoo.json").write_text(json.dumps({"targets_missed": [line]}) + "\n")
    params = load_params(ROOT / "params.yaml")
    params = params.model_copy(
        update={"zoo": params.zoo.model_copy(update={"size": "tiny", "regime": "heavy", "seed": 0})}
    )
    zoo(params, tmp_path, tmp_path / "out")
    out = capsys.readouterr().out
    assert "from the cache" in out and f"zoo: target missed: {line};" in out


def test_zoo_cache_builds_once_and_links_the_same_files(tmp_path, monkeypatch):
    from dppa.zoo.cache import CACHE_ENV, cached_zoo, zoo_key

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    builds = []

    def build(folder):  # stands in for build_zoo: an atomic folder with a manifest
        builds.append(folder)
        folder.mkdir(parents=True)
        (folder / "base").mkdir()
        (folder / "base" / "model.safetensors").write_bytes(b"weights")
        (folder / "zoo.json").write_text("{}\n")

    assert cached_zoo(tmp_path / "a" / "zoo", "tiny", "heavy", 0, build, log=lambda _m: None) is False
    said = []
    assert cached_zoo(tmp_path / "b" / "zoo", "tiny", "heavy", 0, build, log=said.append) is True
    assert len(builds) == 1 and "from the cache" in said[0]
    first, second = (
        tmp_path / "a" / "zoo" / "base" / "model.safetensors",
        tmp_path / "b" / "zoo" / "base" / "model.safetensors",
    )
    assert second.read_bytes() == b"weights" and second.stat().st_ino == first.stat().st_ino  # linked, not copied
    # other settings are another entry; the code is part of the key
    assert cached_zoo(tmp_path / "c" / "zoo", "tiny", "heavy", 1, build, log=lambda _m: None) is False
    assert len(builds) == 2 and zoo_key("tiny", "heavy", 0) != zoo_key("tiny", "heavy", 1)
    code = tmp_path / "package"
    (code / "zoo").mkdir(parents=True)
    (code / "zoo" / "training.py").write_text("STEPS = 1\n")
    monkeypatch.setattr("dppa.zoo.cache.PACKAGE_ROOT", code)
    before = zoo_key("tiny", "heavy", 0)
    (code / "zoo" / "training.py").write_text("STEPS = 2\n")
    assert zoo_key("tiny", "heavy", 0) != before
    monkeypatch.setenv(CACHE_ENV, "off")
    assert cached_zoo(tmp_path / "d" / "zoo", "tiny", "heavy", 0, build, log=lambda _m: None) is False
    assert len(builds) == 3


@pytest.mark.slow
def test_a_shipped_base_is_fine_tuned_as_it_is_and_pretrain_trains_one_anyway(tiny_zoo, tmp_path, monkeypatch):
    import dppa.zoo.shipped as shipped

    monkeypatch.setattr(shipped, "BASES", tmp_path / "bases")
    # ship a base that pre-training cannot give: the tiny zoo's base with one weight changed
    made = tmp_path / "made"
    shutil.copytree(tiny_zoo, made, copy_function=shutil.copyfile)  # writable: the fixture is read-only
    weights = made / "base" / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    assert shipped.ship_base(made) == tmp_path / "bases" / "tiny-s0"
    quiet = {"size": "tiny", "regime": "heavy", "seed": 0, "workers": 1, "log": lambda _msg: None}
    used = build_zoo(tmp_path / "shipped", **quiet)
    assert used["base"]["shipped"] == "dppa/zoo/bases/tiny-s0"
    assert "pretrain_threads" not in used["timing"]
    assert (tmp_path / "shipped" / "base" / "model.safetensors").read_bytes() == weights.read_bytes()
    assert load_file(tmp_path / "shipped" / "arith" / "model.safetensors").keys() == tensors.keys()
    # seed 1 has no shipped base; --pretrain ignores the shipped one and gives the pre-trained bits again
    trained = build_zoo(tmp_path / "trained", pretrain=True, **quiet)
    assert "shipped" not in trained["base"]
    assert _file_hashes(tmp_path / "trained") == _file_hashes(tiny_zoo)
    assert shipped.shipped_base("tiny", 1) is None
    with pytest.raises(ValueError, match="build the zoo with --pretrain"):
        shipped.ship_base(tmp_path / "shipped")
