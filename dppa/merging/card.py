"""The model card (`README.md`) and the recipe (`dppa_recipe.yaml`) written beside every merged model.

The card's front matter holds what the hub reads (`base_model`, `tags`, `library_name`), in the layout of
huggingface_hub's `ModelCardData.to_yaml` (sorted keys, block lists; importing huggingface_hub here cost 0.2 s of
every merge); its body states the merge method and every setting, each input's lineage (hub id and
resolved commit, or local path, and content hash; for a pruned or amplified delta its method, densities and factors)
and, when the pipeline evaluated the model, the scores table. Nothing in either file depends on the time or the
machine beyond the paths given, so the same merge writes the same bytes.

The recipe holds the inputs (paths and content hashes) and options of the merge, so that
`dppa merge --recipe dppa_recipe.yaml -o OUT` rebuilds the same tensors (`recipe_merge_kwargs`).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from dppa.errors import DppaError
from dppa.io.manifest import read_manifest

CARD_NAME = "README.md"
RECIPE_NAME = "dppa_recipe.yaml"
REPORT_CARD = "model_card.md"  # the pipeline's report: the card with the evaluation's scores, as published
RECIPE_VERSION = 1
PAPER = "https://arxiv.org/abs/2403.02799"


def recipe(manifest: dict, inputs: list, base, models: bool, options: dict) -> dict:
    """What `dppa merge` needs to rebuild the merge of `manifest` (a merged model's manifest)."""
    records = manifest.get("finetuned") or manifest.get("deltas") or []
    return {
        "dppa_recipe": RECIPE_VERSION,
        "base": {"path": str(Path(base).resolve()), "content_hash": manifest["base"]["content_hash"]},
        "inputs": [
            {"path": str(Path(p).resolve()), "content_hash": r.get("content_hash", "")} for p, r in zip(inputs, records)
        ],
        "models": models,
        "method": manifest["method"],
        "options": dict(options),
        "weights": list(manifest["weights"]),
        "scale": manifest["scale"],
        "content_hash": manifest["content_hash"],  # of the merged tensors: what a rebuild must give
    }


def read_recipe(path: str | Path) -> dict:
    path = Path(path)
    try:
        body = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DppaError(f"{path}: cannot read the recipe ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(body, dict) or body.get("dppa_recipe") != RECIPE_VERSION:
        raise DppaError(f"{path}: not a dppa recipe of version {RECIPE_VERSION} (no `dppa_recipe: {RECIPE_VERSION}`)")
    missing = [k for k in ("base", "inputs", "method", "weights", "scale") if k not in body]
    if missing:
        raise DppaError(f"{path}: the recipe has no {missing[0]!r}; it is incomplete")
    return body


def recipe_merge_kwargs(body: dict) -> dict:
    """merge_deltas' arguments for a recipe (read_recipe)."""
    return {
        "base": body["base"]["path"],
        "deltas": [i["path"] for i in body["inputs"]],
        "method": body["method"],
        "options": body.get("options") or None,
        "weights": body["weights"],
        "scale": body["scale"],
        "models": bool(body.get("models", True)),
    }


def check_rebuilt(body: dict, manifest: dict, recipe_path: Path) -> None:
    """A rebuild from a recipe read the inputs it names and gave the tensors it records; else one line."""
    records = manifest.get("finetuned") or manifest.get("deltas") or []
    pairs = [("base", body["base"], manifest["base"])] + [
        (f"input {i + 1}", want, got) for i, (want, got) in enumerate(zip(body["inputs"], records))
    ]
    for what, want, got in pairs:
        if want.get("content_hash") and want["content_hash"] != got.get("content_hash"):
            raise DppaError(
                f"{recipe_path}: the {what} ({want['path']}) has changed since the recipe was written (content hash "
                f"{want['content_hash'][:12]}, now {got.get('content_hash', '')[:12]}); the merge is not the same"
            )
    if body.get("content_hash") and body["content_hash"] != manifest["content_hash"]:
        raise DppaError(
            f"{recipe_path}: the rebuilt tensors hash {manifest['content_hash'][:12]}, the recipe records "
            f"{body['content_hash'][:12]}; report this as a bug"
        )


# -- the card -------------------------------------------------------------------------------------------------------
def _origin(record: dict) -> tuple[str, str | None]:
    """(how to name a source in the lineage, its hub id when known)."""
    if record.get("hub_id"):
        commit = record.get("resolved_commit") or record.get("revision") or ""
        return f"`{record['hub_id']}` @ `{commit[:12]}`", record["hub_id"]
    return f"`{record.get('path', '?')}`", None


def _input_rows(manifest: dict) -> tuple[list[str], list[str]]:
    """Table rows for the inputs, and the hub ids of the fine-tunes behind them."""
    rows, hub_ids = [], []
    records = manifest.get("finetuned") or manifest.get("deltas") or []
    for i, (record, weight) in enumerate(zip(records, manifest["weights"])):
        upstream = read_manifest(record["path"]) if Path(record["path"]).is_dir() and "deltas" in manifest else {}
        finetune = upstream.get("finetuned") or record
        origin, hub_id = _origin(finetune)
        if hub_id:
            hub_ids.append(hub_id)
        adapter = finetune.get("adapter")
        kind = upstream.get("kind") or ("LoRA adapter" if adapter else "model")
        if kind == "amplified":
            how = f"DPPA: bands at densities {upstream.get('densities')}, factors {upstream.get('factors')}"
        elif kind == "pruned":
            how = f"{upstream.get('method')} at density {upstream.get('density')}"
        elif kind == "delta":
            how = "dense delta"
        else:
            how = f"{kind}, delta taken on the fly"
        if adapter:
            how += f" (LoRA r={adapter.get('r')}, alpha={adapter.get('lora_alpha')})"
        rows.append(f"| {i + 1} | {origin} | `{finetune.get('content_hash', '')[:16]}` | {how} | {weight:g} |")
    return rows, hub_ids


def card_text(manifest: dict, options: dict, scores: dict | None = None, name: str = "merged model") -> str:
    """The model card of a merged model's manifest; `scores`: {model: {task: score}} when it was evaluated."""
    base_origin, base_hub = _origin(manifest["base"])
    rows, hub_ids = _input_rows(manifest)
    method = manifest["method"]
    data = {"tags": ["merge", "dppa", method.replace("_", "-")], "library_name": "transformers"}
    if base_models := [h for h in [base_hub, *hub_ids] if h]:
        data["base_model"] = base_models
    settings = [f"| method | `{method}` |", f"| scale (lambda) | {manifest['scale']:g} |"]
    settings += [f"| weights | {', '.join(f'{w:g}' for w in manifest['weights'])} |"]
    settings += [f"| {key} | {value} |" for key, value in options.items()]
    lines = [
        f"# {name}",
        "",
        f"A merge of {len(rows)} fine-tune(s) of {base_origin} made with dppa "
        f"(DPPA: Dynamic Pruning + Dynamic Partition Amplification, [arXiv:2403.02799]({PAPER})). "
        f"`{RECIPE_NAME}` beside this card rebuilds it: `dppa merge --recipe {RECIPE_NAME} -o OUT`.",
        "",
        "## Merge",
        "",
        "| setting | value |",
        "| --- | --- |",
        *settings,
        "",
        "## Inputs",
        "",
        f"Base: {base_origin}, content hash `{manifest['base']['content_hash'][:16]}`.",
        "",
        "| # | fine-tune | content hash | as merged | weight |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Merged tensors: content hash `{manifest['content_hash']}` (sha256 over names, dtypes, shapes and bytes).",
    ]
    if scores:
        tasks = sorted({t for model_scores in scores.values() for t in model_scores})
        lines += ["", "## Scores", "", "| model | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        for model, model_scores in scores.items():
            cells = [f"{model_scores[t]:.3f}" if t in model_scores else "" for t in tasks]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    front_matter = yaml.safe_dump(data, sort_keys=True, default_flow_style=False)
    return f"---\n{front_matter}---\n\n" + "\n".join(lines) + "\n"


def scored_card(merged: Path, scores_json: Path) -> str | None:
    """The card of the merged model folder `merged` with the scores of the evaluate stage's `scores_json` ({"models":
    {model: {task: {metric: value}}}}), each task by its primary metric; None when the folder has no recipe."""
    import json

    from dppa.evaluation.scores import primary_scores

    merged = Path(merged)
    if not (merged / RECIPE_NAME).exists():
        return None
    models = json.loads(Path(scores_json).read_text()).get("models") or {}
    scores = {model: primary_scores(metrics) for model, metrics in models.items()}
    body = read_recipe(merged / RECIPE_NAME)
    return card_text(read_manifest(merged), body.get("options") or {}, scores or None, name=merged.name)


def write_card_and_recipe(folder: Path, name: str, manifest: dict, options: dict, inputs: list, base, models: bool):
    """README.md and dppa_recipe.yaml in `folder` (a merged model's temporary folder, to be renamed `name`),
    replacing the card copied from the base."""
    (folder / CARD_NAME).write_text(card_text(manifest, options, name=name))
    body = recipe(manifest, inputs, base, models, options)
    (folder / RECIPE_NAME).write_text(yaml.safe_dump(body, sort_keys=False))
