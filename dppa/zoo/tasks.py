"""The zoo's lm-eval tasks (`zoo_<domain>`): YAML configs plus local JSONL data, materialised on demand.

The validation and test examples come from `dppa.zoo.domains`, a fixed function of the package, so the task files
can be regenerated on any machine; they are written once into a cache folder named by a fingerprint of their
content (lm-eval needs absolute data paths, so the folder is machine-local and never shipped).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import yaml

from dppa.evaluation.task_sources import TaskSource
from dppa.zoo.domains import DOMAINS, domain_splits

TASK_PREFIX = "zoo_"
ZOO_TAG = "zoo"  # names all zoo tasks at once
EVAL_SPLITS = ("validation", "test")
MAX_GEN_TOKS = 12  # longest answer is 5 tokens plus the newline; a model that never stops costs this much
TASKS_DIR_ENV = "DPPA_TASKS_DIR"
COMPLETE_MARKER = ".complete"


def task_name(domain: str) -> str:
    return f"{TASK_PREFIX}{domain}"


def zoo_task_names() -> list[str]:
    return [task_name(d) for d in DOMAINS]


def task_config(domain: str, data_dir: Path) -> dict:
    """lm-eval config: greedy generation up to the first newline, exact match after trimming whitespace."""
    return {
        "task": task_name(domain),
        "tag": [ZOO_TAG],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {s: str(data_dir / domain / f"{s}.jsonl") for s in EVAL_SPLITS}},
        "validation_split": "validation",
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": MAX_GEN_TOKS},
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "regexes_to_ignore": [r"^\s+", r"\s+$"],
            }
        ],
        "metadata": {"version": 1, "description": DOMAINS[domain].description},
    }


def _jsonl(domain: str, split: str) -> bytes:
    rows = [{"prompt": e.prompt, "answer": e.answer} for e in domain_splits(domain)[split]]
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()


@functools.lru_cache(maxsize=1)
def _task_data() -> dict[tuple[str, str], bytes]:
    return {(d, s): _jsonl(d, s) for d in DOMAINS for s in EVAL_SPLITS}


def data_fingerprint() -> str:
    """Hash of the task data and configs: a change to either gets a fresh task folder."""
    digest = hashlib.sha256()
    for (domain, split), data in sorted(_task_data().items()):
        digest.update(f"{domain}/{split}\n".encode() + data)
    for domain in DOMAINS:
        digest.update(json.dumps(task_config(domain, Path("/")), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def write_tasks(folder: Path, final: Path | None = None) -> None:
    """Write every zoo task (YAML + JSONL) into `folder`; the YAML data paths point into `final` (default `folder`),
    the place the files will be read from once moved there."""
    final = (final or folder).resolve()
    for (domain, split), data in _task_data().items():
        (folder / domain).mkdir(parents=True, exist_ok=True)
        (folder / domain / f"{split}.jsonl").write_bytes(data)
    for domain in DOMAINS:
        config = task_config(domain, final)
        (folder / f"{task_name(domain)}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def default_tasks_root() -> Path:
    if os.environ.get(TASKS_DIR_ENV):
        return Path(os.environ[TASKS_DIR_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "dppa" / "zoo-tasks"


@functools.lru_cache(maxsize=4)
def ensure_tasks_dir(root: Path | None = None) -> Path:
    """The folder holding the zoo tasks for the current package data, written if missing; safe under concurrency."""
    target = (root or default_tasks_root()) / data_fingerprint()
    if (target / COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write_tasks(tmp, final=target)
        (tmp / COMPLETE_MARKER).touch()
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / COMPLETE_MARKER).exists():  # not a concurrent writer finishing first: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# The zoo's tasks as a task source of the harness (the `dppa.task_sources` entry point in pyproject.toml): the
# evaluation code knows them only through it.
TASK_SOURCE = TaskSource(
    name="zoo",
    task_names=lambda: [ZOO_TAG, *zoo_task_names()],
    folder=lambda: ensure_tasks_dir(),
    fingerprint=data_fingerprint,
)
