"""Every merged model carries a model card (README.md, front matter through huggingface_hub) and a recipe that
`dppa merge --recipe` rebuilds to the same bytes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from huggingface_hub import ModelCard

from tests.helpers.synthetic import make_base, make_finetune, make_lora_adapter

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def dppa(*args, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "dppa", *map(str, args)], capture_output=True, text=True)
    if check:
        assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    base = make_base(root / "base")
    # what `dppa fetch` records in a hub model's folder: the card names the base by hub id
    record = {"kind": "model", "source": "hub", "hub_id": "org/base", "revision": "main", "resolved_commit": COMMIT}
    (base / "dppa_manifest.json").write_text(json.dumps(record))
    (base / "README.md").write_text("---\nlicense: other\n---\n# the base's own card\n")
    adapter = make_lora_adapter(root / "adapter", seed=2, modules={"model.layers.0.self_attn.q_proj": (32, 32)})
    return root, base, make_finetune(base, root / "ft", seed=1), adapter


@pytest.mark.slow
def test_merged_model_card_names_method_settings_and_lineage(models):
    root, base, ft, adapter = models
    out = root / "merged"
    dppa("merge", base, ft, adapter, "-o", out, "--method", "ties", "--density", "0.3", "--weights", "1,0.5", "-q")
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["org/base"]
    assert card.data.tags == ["merge", "dppa", "ties"] and card.data.library_name == "transformers"
    manifest = json.loads((out / "dppa_manifest.json").read_text())
    text = card.text
    assert "the base's own card" not in text  # the base's card is replaced, not carried over
    assert "| density | 0.3 |" in text and "| weights | 1, 0.5 |" in text
    assert f"`org/base` @ `{COMMIT[:12]}`" in text
    for record in manifest["finetuned"]:
        assert f"`{record['path']}` | `{record['content_hash'][:16]}`" in text
    assert "LoRA adapter" in text and manifest["content_hash"] in text


@pytest.mark.slow
def test_card_of_amplified_deltas_gives_bands_and_factors(models):
    root, base, ft, _ = models
    dppa("extract", base, ft, "-o", root / "delta", "-q")
    dppa("amplify", root / "delta", "-o", root / "amp", "--densities", "0.1,0.2", "--factors", "1.8,1.0", "-q")
    dppa("merge", base, root / "amp", "-o", root / "merged-amp", "--method", "task_arithmetic", "--scale", "0.7", "-q")
    text = ModelCard.load(root / "merged-amp" / "README.md").text
    assert "DPPA: bands at densities [0.1, 0.2], factors [1.8, 1.0]" in text and "| scale (lambda) | 0.7 |" in text


@pytest.mark.slow
def test_recipe_rebuilds_the_same_bytes_and_refuses_a_changed_input(models):
    root, base, ft, adapter = models
    first = root / "first"
    dppa("merge", base, ft, adapter, "-o", first, "--method", "ties", "--density", "0.4", "--scale", "0.9", "-q")
    recipe = first / "dppa_recipe.yaml"
    body = yaml.safe_load(recipe.read_text())
    assert (body["method"], body["options"], body["scale"]) == ("ties", {"density": 0.4}, 0.9)
    dppa("merge", "--recipe", recipe, "-o", root / "again", "-q")
    again = json.loads((root / "again" / "dppa_manifest.json").read_text())
    assert again["content_hash"] == json.loads((first / "dppa_manifest.json").read_text())["content_hash"]
    assert (root / "again" / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()

    refused = dppa("merge", "--recipe", recipe, "-o", root / "x", "--scale", "2", check=False)
    assert refused.returncode != 0 and "--scale: not with --recipe" in refused.stderr

    changed = root / "ft-changed"
    make_finetune(base, changed, seed=9)
    body["inputs"][0]["path"] = str(changed)
    (root / "changed.yaml").write_text(yaml.safe_dump(body))
    done = dppa("merge", "--recipe", root / "changed.yaml", "-o", root / "y", check=False)
    assert done.returncode != 0 and "has changed since the recipe was written" in done.stderr
    assert "Traceback" not in done.stderr and not (root / "y").exists()
