"""Build the demo zoo: a tokenizer, a pre-trained base and one fine-tune per domain, each an HF model folder.

OUT/base/, OUT/<domain>/ (safetensors, config, tokenizer files) and OUT/zoo.json: sizes, seeds, and per fine-tune
its exact match on its own test split, the base's score there and mean|delta|/mean|base|; plus the build's timings.
Every file is a function of (size, regime, seed) and the machine, except the timings under zoo.json's "timing"
key: the build is deterministic and writes atomically.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from dppa.errors import DppaError
from dppa.io.atomic import atomic_dir, check_output_free
from dppa.zoo.corpus import pretraining_text
from dppa.zoo.domains import DATA_SEED, DOMAINS, domain_splits
from dppa.zoo.model import SIZES, build_model
from dppa.zoo.tasks import data_fingerprint, task_name, zoo_task_names
from dppa.zoo.tokenizer import train_tokenizer
from dppa.zoo.training import REGIMES, finetune, pretrain

TOKENIZER_SAMPLES_PER_DOMAIN = 2000  # domain training text the tokenizer also sees, so domain words get tokens
LINEAR_SCOPE = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight")
MANIFEST = "zoo.json"
EVAL_BATCH = 64


def own_scores(model: PreTrainedModel, tokenizer, tasks: list[str], limit: int | None) -> dict[str, float]:
    """Exact match of an in-memory model on each task's test split (first `limit` examples), one thread."""
    import torch

    from dppa.evaluation.harness import evaluate_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = evaluate_model(model, tokenizer, tasks, split="test", limit=limit, batch_size=EVAL_BATCH)
    finally:
        torch.set_num_threads(threads)
    return {task: metrics[task]["exact_match"] for task in tasks}


def relative_delta(base: PreTrainedModel, finetuned: PreTrainedModel, scope: re.Pattern | None = None) -> float:
    """mean|ft - base| / mean|base| over the parameters (those whose name matches `scope`, when given)."""
    base_params = dict(base.named_parameters())
    delta_sum = base_sum = 0.0
    for name, param in finetuned.named_parameters():
        if scope is not None and not scope.fullmatch(name):
            continue
        delta_sum += (param.detach() - base_params[name].detach()).abs().sum().item()
        base_sum += base_params[name].detach().abs().sum().item()
    return delta_sum / base_sum


def _save(model: PreTrainedModel, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@dataclass(frozen=True)
class FinetuneJob:
    domain: str
    base_dir: Path
    out_dir: Path
    size: str
    regime: str
    seed: int


def run_finetune(job: FinetuneJob, log: Callable[[str], None] = print) -> dict:
    """Fine-tune the saved base on one domain and save it; returns the domain's entry of zoo.json.

    Starts from the base folder on disk (not an object in memory) so it runs the same in a worker process.
    """
    started = time.perf_counter()
    spec = SIZES[job.size]
    base = AutoModelForCausalLM.from_pretrained(job.base_dir)
    model = AutoModelForCausalLM.from_pretrained(job.base_dir)
    tokenizer = AutoTokenizer.from_pretrained(job.base_dir)
    loss = finetune(
        model, tokenizer, domain_splits(job.domain)["train"], regime=REGIMES[job.regime],
        steps=spec.finetune_steps[job.regime], batch=spec.finetune_batch, seed=job.seed, log=log, label=job.domain,
    )  # fmt: skip
    _save(model, tokenizer, job.out_dir)
    trained = time.perf_counter()
    task = task_name(job.domain)
    stats = {
        "task": task,
        "exact_match": own_scores(model, tokenizer, [task], spec.eval_limit)[task],
        "description": DOMAINS[job.domain].description,
        "final_loss": round(loss, 4),
        "relative_delta": relative_delta(base, model),
        "relative_delta_linear": relative_delta(base, model, LINEAR_SCOPE),
    }
    stats["timing"] = {"finetune_seconds": trained - started, "eval_seconds": time.perf_counter() - trained}
    log(
        f"{job.domain}: exact match {stats['exact_match']:.3f} on {task} (test), "
        f"mean|delta|/mean|base| = {stats['relative_delta']:.4f} (linear layers {stats['relative_delta_linear']:.4f})"
    )
    return stats


def score_base(base_dir: Path, limit: int | None) -> dict[str, float]:
    """The saved base's exact match on every zoo task (test split)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    return own_scores(model, AutoTokenizer.from_pretrained(base_dir), zoo_task_names(), limit)


def _run_jobs(
    jobs: list[FinetuneJob], base_dir: Path, limit: int | None, workers: int, log: Callable[[str], None]
) -> tuple[list[dict], dict[str, float]]:
    """Fine-tune every domain, and score the base meanwhile; returns the domains' entries and the base's scores."""
    if workers <= 1:
        return [run_finetune(job, log) for job in jobs], score_base(base_dir, limit)
    # Separate processes, one thread each: the domains train in parallel without sharing a thread pool.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_quiet_worker) as pool:
        futures = [pool.submit(run_finetune, job) for job in jobs]
        base_scores = pool.submit(score_base, base_dir, limit)
        return [f.result() for f in futures], base_scores.result()


def _quiet_worker() -> None:
    # Progress bars of weight loading, one per worker, would drown the training log.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # the zoo's own scores are logged, not the harness's


def default_workers() -> int:
    return max(1, min(len(DOMAINS), os.cpu_count() or 1))


def build_zoo(
    out: str | Path,
    *,
    size: str = "default",
    regime: str = "heavy",
    seed: int = 0,
    overwrite: bool = False,
    workers: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Build the zoo into `out`; returns the manifest written to OUT/zoo.json.

    `workers` processes fine-tune the domains in parallel (default: one per core, at most one per domain); the
    files do not depend on it.
    """
    if size not in SIZES:
        raise DppaError(f"unknown zoo size {size!r}; choose one of {', '.join(SIZES)}")
    if regime not in REGIMES:
        raise DppaError(f"unknown fine-tuning regime {regime!r}; choose one of {', '.join(REGIMES)}")
    out = Path(out)
    check_output_free(out, overwrite)  # fail before minutes of training, not after
    spec, reg = SIZES[size], REGIMES[regime]
    started = time.perf_counter()
    texts = pretraining_text(seed, spec.corpus_sentences, spec.skill_share)
    domain_texts = [
        e.prompt + e.completion for d in DOMAINS for e in domain_splits(d)["train"][:TOKENIZER_SAMPLES_PER_DOMAIN]
    ]
    tokenizer = train_tokenizer(texts + domain_texts, spec.vocab)
    manifest: dict = {
        "size": size,
        "regime": {"name": reg.name, "lr": reg.lr, "steps": spec.finetune_steps[regime], "batch": spec.finetune_batch},
        "seed": seed,
        "data_seed": DATA_SEED,
        "task_data_fingerprint": data_fingerprint(),
        "eval": {"split": "test", "limit": spec.eval_limit, "metric": "exact_match"},
    }
    timing: dict = {}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        base = build_model(spec, tokenizer, seed)
        loss = pretrain(
            base, tokenizer, texts, steps=spec.pretrain_steps, batch=spec.pretrain_batch, seq=spec.pretrain_seq,
            lr=spec.pretrain_lr, seed=seed, log=log,
        )  # fmt: skip
        manifest["base"] = {"parameters": sum(p.numel() for p in base.parameters()), "final_loss": round(loss, 4)}
        _save(base, tokenizer, tmp / "base")
        timing["pretrain_seconds"] = time.perf_counter() - started
        jobs = [
            FinetuneJob(domain, tmp / "base", tmp / domain, size, regime, seed * 1000 + index + 1)
            for index, domain in enumerate(DOMAINS)
        ]
        stats, manifest["base"]["exact_match"] = _run_jobs(
            jobs, tmp / "base", spec.eval_limit, workers or default_workers(), log
        )
        timing["finetune_wall_seconds"] = time.perf_counter() - started - timing["pretrain_seconds"]
        manifest["domains"] = {}
        for job, entry in zip(jobs, stats):
            timing[job.domain] = entry.pop("timing")
            entry["base_exact_match"] = manifest["base"]["exact_match"][entry["task"]]
            manifest["domains"][job.domain] = entry
        # Timings are the only part of the manifest that differs between runs with the same arguments.
        timing["build_seconds"] = time.perf_counter() - started
        manifest["timing"] = timing
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    log(f"zoo ({size}, {regime}) built in {time.perf_counter() - started:.1f} s: {out}")
    return manifest


def read_manifest(zoo: str | Path) -> dict:
    path = Path(zoo) / MANIFEST
    if not path.exists():
        raise DppaError(f"{zoo}: no {MANIFEST}; is this a folder built by `dppa zoo`?")
    return json.loads(path.read_text())
