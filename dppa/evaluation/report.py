"""The results report: every model's scores as a pandas table (CSV and Markdown), a summary for `dvc metrics`,
and PNG plots of the scores per model and of each fine-tune's amplification search."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd

from dppa.evaluation.objective import normalised_score, task_owners
from dppa.evaluation.scores import primary_scores
from dppa.io.atomic import atomic_dir, atomic_write_text

MEAN = "mean"
NORMALISED = "normalised"


def scores_table(scores: dict) -> pd.DataFrame:
    """Rows: models (base, fine-tunes, merged); columns: tasks, their mean, and the normalised score.

    The normalised score (dppa.evaluation.objective) is the geometric mean over tasks of the model's score over
    the dense fine-tune that owns the task (the paper's measure); tasks whose owner scores 0 are left out.
    """
    tasks = scores["tasks"]
    owners = {t: ft for t, ft in task_owners(scores["finetunes"]).items() if t in tasks}
    rows = {model: primary_scores({t: m[t] for t in tasks}) for model, m in scores["models"].items()}
    dense = {t: rows[ft][t] for t, ft in owners.items() if ft in rows}
    table = pd.DataFrame.from_dict(rows, orient="index")[tasks]
    table[MEAN] = table[tasks].mean(axis=1)
    normalised = {model: normalised_score({t: row[t] for t in dense}, dense) for model, row in rows.items()}
    table[NORMALISED] = [math.nan if normalised[m] is None else normalised[m] for m in table.index]
    table.index.name = "model"
    return table


def summary(table: pd.DataFrame) -> dict:
    """{model: {mean, normalised}}: the numbers `dvc metrics show/diff` compare across runs."""
    return {
        model: {"mean": _number(row[MEAN]), "normalised": _number(row[NORMALISED])} for model, row in table.iterrows()
    }


def _number(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 6)


def read_traces(folder: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """Each fine-tune's search trace (CSV named after it); fine-tunes with fixed factors have an empty trace."""
    folder = Path(folder)
    traces = {}
    for path in sorted(folder.glob("*.csv")) if folder.is_dir() else []:
        frame = pd.read_csv(path)
        if not frame.empty:
            traces[path.stem] = frame
    return traces


def plot_scores(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in table.columns if c != NORMALISED]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(columns)), 4))
    table[columns].T.plot.bar(ax=ax, rot=0, width=0.8)
    ax.set_ylabel("score (primary metric)")
    ax.set_title("scores per model and task")
    ax.legend(fontsize="small", ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_search(traces: dict[str, pd.DataFrame], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, frame in traces.items():
        ax.plot(frame["index"], frame["score"], "o", alpha=0.4, label=f"{name}: candidates")
        ax.plot(frame["index"], frame["best_score"], "-", label=f"{name}: best so far")
    if not traces:
        ax.text(0.5, 0.5, "no search: fixed factors from params.yaml", ha="center", va="center")
    ax.set_xlabel("candidate")
    ax.set_ylabel("objective (validation, normalised to the dense fine-tune)")
    ax.set_title("amplification factor search")
    if traces:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    scores_json: str | os.PathLike,
    traces: str | os.PathLike,
    out: str | os.PathLike,
    summary_json: str | os.PathLike,
    notes: str = "",
    extra_files: dict[str, str] | None = None,
) -> pd.DataFrame:
    """Write out/{scores.csv, scores.md, scores.png, search.png} and the summary metrics file; returns the table.
    `notes` (Markdown) is appended to scores.md; `extra_files` ({name: text}) join the report."""
    scores = json.loads(Path(scores_json).read_text())
    if scores.get("skipped"):
        return _write_nothing_evaluated(scores["skipped"], traces, out, summary_json, notes, extra_files)
    table = scores_table(scores)
    with atomic_dir(out, overwrite=True) as tmp:
        table.to_csv(tmp / "scores.csv", float_format="%.4f")
        heading = f"Scores on the {scores['split']} split (limit {scores.get('limit')} examples per task)\n\n"
        (tmp / "scores.md").write_text(heading + table.to_markdown(floatfmt=".3f") + "\n" + notes)
        plot_scores(table, tmp / "scores.png")
        plot_search(read_traces(traces), tmp / "search.png")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    atomic_write_text(summary_json, json.dumps(summary(table), indent=2) + "\n")
    return table


def _write_nothing_evaluated(why: str, traces, out, summary_json, notes: str, extra_files=None) -> pd.DataFrame:
    """The report of a pipeline that evaluates nothing (a merge-only pipeline): the same files, saying so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = pd.DataFrame(index=pd.Index([], name="model"))
    with atomic_dir(out, overwrite=True) as tmp:
        table.to_csv(tmp / "scores.csv")
        (tmp / "scores.md").write_text(f"Nothing was evaluated: {why}.\n" + notes)
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, f"nothing was evaluated:\n{why}", ha="center", va="center")
        ax.set_axis_off()
        fig.savefig(tmp / "scores.png", dpi=110)
        plt.close(fig)
        plot_search(read_traces(traces), tmp / "search.png")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    atomic_write_text(summary_json, json.dumps({"skipped": why}, indent=2) + "\n")
    return table
