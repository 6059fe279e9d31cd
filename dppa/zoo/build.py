"""Build a zoo: a base and one fine-tune per domain, each an HF model folder (or, light real fine-tunes, a PEFT
LoRA adapter folder).

Two kinds of base: the small sizes (tiny, default) train a tokenizer and pre-train a base here; a pretrained size
(smollm2-135m, dppa.zoo.pretrained) starts from a real pre-trained LLM.
OUT/base/, OUT/<domain>/ (safetensors, config, tokenizer files) and OUT/zoo.json: sizes, seeds, and per fine-tune
its exact match on its own test split, the base's score there and mean|delta|/mean|base|; plus the build's timings.
The scores are those of the folders as saved (a bf16 fine-tune, an adapter merged onto the bf16 base).
Every file is a function of (size, regime, seed) and the machine, except the timings under zoo.json's "timing"
key: the build is deterministic and writes atomically. The base of (default, seed 0) is shipped pre-trained
(dppa/zoo/shipped.py): such a zoo pre-trains nothing unless asked to.
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
from dppa.io.space import check_free_space
from dppa.zoo.corpus import pretraining_text
from dppa.zoo.domains import DATA_SEED, DOMAINS, domain_splits
from dppa.zoo.model import SIZES, build_model
from dppa.zoo.pretrained import PRETRAINED, add_lora, write_base
from dppa.zoo.shipped import copy_base, shipped_base
from dppa.zoo.tasks import data_fingerprint, task_name, zoo_task_names
from dppa.zoo.tokenizer import train_tokenizer
from dppa.zoo.training import REGIMES, Regime, finetune, pretrain, pretrain_threads

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
        base_param = base_params[name].detach().float()  # bf16 differences would round
        delta_sum += (param.detach().float() - base_param).abs().sum().item()
        base_sum += base_param.abs().sum().item()
    return delta_sum / base_sum


def _save(model: PreTrainedModel, tokenizer, folder: Path) -> None:
    if hasattr(model, "peft_config"):
        # The adapter never trains the embeddings; without this, peft looks for the base's config on the hub to see
        # whether the vocabulary changed (and warns, offline).
        model.save_pretrained(folder, save_embedding_layers=False)
    else:
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


def finetune_seed(zoo_seed: int, domain: str) -> int:
    """The training seed of `domain`'s fine-tune in the zoo of `zoo_seed`: one per domain, none shared across zoos."""
    return zoo_seed * 1000 + list(DOMAINS).index(domain) + 1


def _train(job: FinetuneJob, tokenizer, log: Callable[[str], None]) -> tuple[PreTrainedModel, float]:
    """Fine-tune the saved base on the job's domain and save the result in job.out_dir; (saved model, last loss).

    A pretrained size's light regime saves a PEFT LoRA adapter, its heavy regime a bf16 model; the small sizes
    save float32 models. The model returned is the saved one as the pipeline reads it (adapter merged onto the
    bf16 base, as peft's merge_and_unload writes it; weights rounded to bf16).
    """
    import torch

    examples = domain_splits(job.domain)["train"]
    if job.size not in PRETRAINED:
        spec = SIZES[job.size]
        model = AutoModelForCausalLM.from_pretrained(job.base_dir)
        loss = finetune(
            model, tokenizer, examples, regime=REGIMES[job.regime], steps=spec.finetune_steps[job.regime],
            batch=spec.finetune_batch, seed=job.seed, log=log, label=job.domain,
        )  # fmt: skip
        _save(model, tokenizer, job.out_dir)
        return model, loss
    from dppa.evaluation.harness import load_model

    recipe = PRETRAINED[job.size].recipes[job.regime]
    model = AutoModelForCausalLM.from_pretrained(job.base_dir, dtype=torch.float32)  # trained in float32
    if recipe.lora_rank:
        model = add_lora(model, recipe, job.seed)
    elif not recipe.train_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    regime = Regime(job.regime, lr=recipe.lr, weight_decay=0.0, schedule=recipe.schedule, warmup=recipe.warmup)
    loss = finetune(
        model, tokenizer, examples, regime=regime, steps=recipe.steps, batch=recipe.batch, seed=job.seed, log=log,
        label=job.domain,
    )  # fmt: skip
    if not recipe.lora_rank:
        model = model.to(torch.bfloat16)
    _save(model, tokenizer, job.out_dir)
    saved, _ = load_model(job.out_dir, device="cpu", base=job.base_dir if recipe.lora_rank else None)
    return saved, loss


def run_finetune(job: FinetuneJob, log: Callable[[str], None] = print) -> dict:
    """Fine-tune the saved base on one domain and save it; returns the domain's entry of zoo.json.

    Starts from the base folder on disk (not an object in memory) so it runs the same in a worker process.
    """
    started = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(job.base_dir)
    tokenizer = AutoTokenizer.from_pretrained(job.base_dir)
    model, loss = _train(job, tokenizer, log)
    trained = time.perf_counter()
    task = task_name(job.domain)
    stats = {
        "task": task,
        "exact_match": own_scores(model, tokenizer, [task], _eval_limit(job.size))[task],  # float32: load_model
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


def _eval_limit(size: str) -> int | None:
    return (PRETRAINED[size] if size in PRETRAINED else SIZES[size]).eval_limit


def score_base(base_dir: Path, limit: int | None) -> dict[str, float]:
    """The saved base's exact match on every zoo task (test split)."""
    from dppa.evaluation.harness import to_compute_dtype

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    to_compute_dtype(model)  # float32 on CPU, as every evaluation
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


def _zoo_bytes(size: str, regime: str) -> int:
    """About how much the zoo folder takes: a base and one fine-tune per domain."""
    if size in PRETRAINED:
        return PRETRAINED[size].disk_bytes[regime]
    z = SIZES[size]
    params = 2 * z.vocab * z.hidden + z.layers * (4 * z.hidden * z.hidden + 3 * z.hidden * z.intermediate)
    return (1 + len(DOMAINS)) * 4 * params


def build_zoo(
    out: str | Path,
    *,
    size: str = "default",
    regime: str = "heavy",
    seed: int = 0,
    overwrite: bool = False,
    workers: int | None = None,
    pretrain: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Build the zoo into `out`; returns the manifest written to OUT/zoo.json.

    `workers` processes fine-tune the domains in parallel (default: one per core, at most one per domain); the
    files do not depend on it. A small size whose base is shipped for this seed (dppa/zoo/shipped.py) fine-tunes
    that base, unless `pretrain`.
    """
    if size not in SIZES and size not in PRETRAINED:
        raise DppaError(f"unknown zoo size {size!r}; choose one of {', '.join([*SIZES, *PRETRAINED])}")
    if regime not in REGIMES:
        raise DppaError(f"unknown fine-tuning regime {regime!r}; choose one of {', '.join(REGIMES)}")
    out = Path(out)
    check_output_free(out, overwrite)  # fail before minutes of training, not after
    check_free_space(out, _zoo_bytes(size, regime))
    import torch

    started = time.perf_counter()
    manifest: dict = {
        "size": size,
        "seed": seed,
        "data_seed": DATA_SEED,
        "task_data_fingerprint": data_fingerprint(),
        "eval": {"split": "test", "limit": _eval_limit(size), "metric": "exact_match"},
        # The CPU kernels torch dispatched to (AVX512, AVX2, ...): float32 rounds differently under each, and the
        # real heavy arith learns or not with it. ATEN_CPU_CAPABILITY=avx2 on an AVX-512 machine gives AVX2's.
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
    }
    timing: dict = {}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if size in PRETRAINED:
            recipe = PRETRAINED[size].recipes[regime]
            manifest["regime"] = {"name": regime, **{k: v for k, v in vars(recipe).items() if v is not None}}
            manifest["regime"]["format"] = "peft-lora-adapter" if recipe.lora_rank else "full"
            manifest["base"] = write_base(tmp / "base")
        elif (shipped := None if pretrain else shipped_base(size, seed)) is not None:
            manifest["base"] = copy_base(shipped, tmp / "base")
            log(f"base: the pre-trained base shipped in {manifest['base']['shipped']} (--pretrain trains one here)")
        else:
            timing["pretrain_threads"] = pretrain_threads()  # the speed, not the weights, depends on it
            _pretrain_base(tmp / "base", SIZES[size], seed, manifest, timing["pretrain_threads"], log)
            manifest["regime"] = {
                "name": regime, "lr": REGIMES[regime].lr, "steps": SIZES[size].finetune_steps[regime],
                "batch": SIZES[size].finetune_batch,
            }  # fmt: skip
        timing["base_seconds"] = time.perf_counter() - started
        jobs = [
            FinetuneJob(domain, tmp / "base", tmp / domain, size, regime, finetune_seed(seed, domain))
            for domain in DOMAINS
        ]
        stats, manifest["base"]["exact_match"] = _run_jobs(
            jobs, tmp / "base", _eval_limit(size), workers or default_workers(), log
        )
        timing["finetune_wall_seconds"] = time.perf_counter() - started - timing["base_seconds"]
        manifest["domains"] = {}
        for job, entry in zip(jobs, stats):
            timing[job.domain] = entry.pop("timing")
            entry["base_exact_match"] = manifest["base"]["exact_match"][entry["task"]]
            manifest["domains"][job.domain] = entry
        manifest["targets_missed"] = _missed_targets(manifest, size, regime, log)
        # Timings are the only part of the manifest that differs between runs with the same arguments.
        timing["build_seconds"] = time.perf_counter() - started
        manifest["timing"] = timing
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    log(f"zoo ({size}, {regime}) built in {time.perf_counter() - started:.1f} s: {out}")
    return manifest


def _missed_targets(manifest: dict, size: str, regime: str, log: Callable[[str], None]) -> list[str]:
    """The model targets (scripts/check_zoo.py) this build missed, each logged on one line. Fine-tuning is
    deterministic on one machine, not across machines: a recipe near its edge (the real heavy arith) can fail to
    learn on another CPU, and then every score measured against that fine-tune is noise."""
    from dppa.zoo.check import model_failures, targets_for

    missed = model_failures(manifest["base"]["exact_match"], manifest["domains"], targets_for(size, regime))
    log_missed_targets(missed, log)
    return missed


def log_missed_targets(missed: list[str], log: Callable[[str], None] = print) -> None:
    for failure in missed:
        log(f"zoo: target missed: {failure}; results measured on this zoo are weak there (another --seed may meet it)")


def _pretrain_base(folder: Path, spec, seed: int, manifest: dict, threads: int, log: Callable[[str], None]) -> None:
    """A small size's base: a tokenizer trained on the corpus and domain text, then a model pre-trained on it."""
    texts = pretraining_text(seed, spec.corpus_sentences, spec.skill_share)
    domain_texts = [
        e.prompt + e.completion for d in DOMAINS for e in domain_splits(d)["train"][:TOKENIZER_SAMPLES_PER_DOMAIN]
    ]
    tokenizer = train_tokenizer(texts + domain_texts, spec.vocab)
    base = build_model(spec, tokenizer, seed)
    loss = pretrain(
        base, tokenizer, texts, steps=spec.pretrain_steps, batch=spec.pretrain_batch, seq=spec.pretrain_seq,
        lr=spec.pretrain_lr, seed=seed, log=log, threads=threads,
    )  # fmt: skip
    manifest["base"] = {"parameters": sum(p.numel() for p in base.parameters()), "final_loss": round(loss, 4)}
    _save(base, tokenizer, folder)


def read_manifest(zoo: str | Path) -> dict:
    path = Path(zoo) / MANIFEST
    if not path.exists():
        raise DppaError(f"{zoo}: no {MANIFEST}; is this a folder built by `dppa zoo`?")
    return json.loads(path.read_text())
