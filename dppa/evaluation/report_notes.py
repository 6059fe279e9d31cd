"""The report's notes beyond the score table: what pruning cost each fine-tune alone (the score stage's records)
and the merge scale used (the merge stage's record)."""

from __future__ import annotations

from pathlib import Path


def finetune_table(finetunes: Path) -> list[dict]:
    """One row per fine-tune from the score stage's records (FOLDER/NAME.json): each variant's mean score over
    the fine-tune's tasks, and its normalised score (over the dense fine-tune's)."""
    import json

    rows = []
    for path in sorted(Path(finetunes).glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("skipped"):
            continue
        row = {"fine-tune": path.stem, "pruning": f"{record['method']} {record['density']:g}"}
        for variant, scores in record["scores"].items():
            row[variant] = sum(scores.values()) / len(scores)
        for variant, value in record["normalised"].items():
            row[f"{variant} / dense"] = value
        rows.append(row)
    return rows


def pipeline_notes(finetunes: Path, merge_json: Path) -> str:
    """Markdown for the report: what pruning cost each fine-tune, and the merge scale used."""
    import json

    import pandas as pd

    rows = finetune_table(finetunes)
    text = ""
    if rows:
        table = pd.DataFrame(rows).set_index("fine-tune")
        text += "\nEach fine-tune alone (same split), pruned and amplified, against its dense self\n\n"
        text += table.to_markdown(floatfmt=".3f") + "\n"
    not_scored: dict[str, list[str]] = {}  # why -> fine-tunes
    for path in sorted(Path(finetunes).glob("*.json")):
        why = json.loads(path.read_text()).get("skipped")
        if why:
            not_scored.setdefault(why, []).append(path.stem)
    for why, names in not_scored.items():
        text += f"\nNot scored alone ({why}): {', '.join(names)}\n"
    merge = json.loads(Path(merge_json).read_text()) if Path(merge_json).exists() else None
    if merge:
        how = (
            f"searched on the validation split (objective {merge['best_score']:.3f})"
            if merge["searched"]
            else "fixed in params.yaml"
        )
        weights = merge.get("weights")
        chosen = f" with weights {', '.join(f'{n} {w:g}' for n, w in weights.items())}" if weights else ""
        text += f"\nMerge scale {merge['scale']:g}{chosen}, {how}\n"
    return text
