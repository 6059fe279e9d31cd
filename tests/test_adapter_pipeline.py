"""The pipeline with LoRA adapters as its fine-tunes: real DVC, real Prefect, real lm-eval, real peft.

Two adapters of the tiny zoo's base (random non-zero factors, saved by peft) are the fine-tunes of params.yaml, as
local folders. `dvc repro` must run every stage on them: the deltas are taken from the adapters, and the dense
fine-tunes are scored as base + adapter, which must give the scores of peft's own merged model folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers.delta_files import load_delta
from tests.helpers.pipeline import ALL_STAGES, FINETUNES, dvc, make_project, stages_run

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.slow


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    """(adapter folder, merge_and_unload folder) of a LoRA on q/v/up projections with random factors."""
    from transformers import AutoModelForCausalLM

    wrapped = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    wrapped.save_pretrained(out / "adapter")
    wrapped.merge_and_unload().save_pretrained(out / "merged")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (base / name).exists():
            (out / "merged" / name).write_bytes((base / name).read_bytes())
    return out


def test_dvc_repro_on_lora_adapters(tmp_path, tiny_zoo, stage_server, monkeypatch):
    adapters = {ft: make_adapter(tiny_zoo / "base", tmp_path / ft, seed=i) for i, ft in enumerate(FINETUNES)}
    project = make_project(tmp_path / "project", tiny_zoo)
    params = yaml.safe_load((project / "params.yaml").read_text())
    for ft in FINETUNES:
        params["models"]["finetunes"][ft]["source"] = str(adapters[ft] / "adapter")
    params["merge"].update(scale=0.8, search=None)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    # the warm server only here: the publish runs below change HF_* settings that huggingface_hub reads on import
    assert stages_run(dvc(project, "repro", server=stage_server).stdout) == ALL_STAGES

    base = load_file(tiny_zoo / "base" / "model.safetensors")
    for ft in FINETUNES:
        merged = load_file(adapters[ft] / "merged" / "model.safetensors")
        delta = load_delta(project / "data" / "deltas" / ft)
        assert set(delta) == set(base)
        for name in base:  # the delta of the adapter is peft's merged model minus the base
            assert torch.equal(delta[name], merged[name] - base[name]), name
        manifest = json.loads((project / "data" / "deltas" / ft / "dppa_manifest.json").read_text())
        assert manifest["finetuned"]["adapter"]["adapted"]

    scores = json.loads((project / "data/metrics/scores.json").read_text())
    from dppa.evaluation.scores import score_folder

    for ft in FINETUNES:  # the adapter scored as base + adapter = peft's merged folder scored as a model
        alone, _ = score_folder(
            adapters[ft] / "merged",
            scores["tasks"],
            split=scores["split"],
            limit=scores["limit"],
            batch_size=8,
            device="cpu",
            cache=None,
        )
        assert scores["models"][ft] == alone
        record = json.loads((project / f"data/metrics/finetunes/{ft}.json").read_text())
        assert record["scores"]["dense"][f"zoo_{ft}"] == alone[f"zoo_{ft}"]["exact_match"]

    # the merged model's card names the adapters; the report's copy adds the scores of every model
    from huggingface_hub import ModelCard

    card = ModelCard.load(project / "data/merged/model/README.md")
    assert card.data.tags == ["merge", "dppa", "ties"] and card.text.count(
        "DPPA: bands at densities [0.1, 0.2], factors [1.8, 1.0] (LoRA r=4, alpha=8)"
    ) == len(FINETUNES)
    scored = ModelCard.load(project / "data/report/model_card.md").text
    merged_arith = scores["models"]["merged"]["zoo_arith"]["exact_match"]
    assert "## Scores" in scored and f"| merged | {merged_arith:.3f} |" in scored

    # publish: off by default; then to the local hub, refused by the gate, then published, then nothing to do
    assert json.loads((project / "data/metrics/publish.json").read_text())["published"] is False
    from tests.helpers.hub_server import FakeHub

    token = "hf_PipelineToken0123456789abcdefgh"
    with FakeHub(token=token) as hub:
        env = dict(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_TOKEN=token, HF_HUB_DISABLE_XET="1")
        for key, value in {**env, "HF_HOME": str(tmp_path / "hf")}.items():
            monkeypatch.setenv(key, value)

        def publish_with(gate: dict) -> dict:
            params["publish"] = {"repo": "team/merged", "gate": gate}
            (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            done = dvc(project, "repro")
            assert stages_run(done.stdout) == {"publish"}
            return json.loads((project / "data/metrics/publish.json").read_text())

        refused = publish_with({"min_score": 2.0})
        assert not refused["published"] and refused["reason"].startswith("refused by the gate") and not hub.repos
        published = publish_with({"min_score": None})
        assert published["published"] and published["commit"] == hub.repos["team/merged"].refs["main"]
        files = hub.repos["team/merged"].commits[published["commit"]]
        assert "## Scores" in files["README.md"].decode()  # the report's card, with the scores
        assert files["model.safetensors"] == (project / "data/merged/model/model.safetensors").read_bytes()
        commits = len(hub.repos["team/merged"].commits)
        dvc(project, "repro", "--force", "--single-item", "publish")
        again = json.loads((project / "data/metrics/publish.json").read_text())
        assert again["reason"].startswith("unchanged") and len(hub.repos["team/merged"].commits) == commits
        assert token not in (project / "data/metrics/publish.json").read_text()
