"""Training loops of the zoo: causal-LM pre-training on packed general text and prompt-masked fine-tuning.

Everything random draws from generators seeded by the caller, and deterministic kernels are switched on, so the same
seed on the same machine gives bit-identical weights.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dppa.zoo.domains import Example

IGNORE = -100  # label id that the loss skips


@dataclass(frozen=True)
class Regime:
    """How hard a fine-tune pushes: "light" stays near the base, "heavy" drifts far (the regime DPPA targets)."""

    name: str
    lr: float
    weight_decay: float
    # After warm-up over the first `warmup` share of the steps: "cosine" decays to a tenth of the peak, "constant"
    # holds it (the real zoo's heavy fine-tunes: twice the distance from the base for the same peak, see
    # dppa/zoo/pretrained.py).
    schedule: str = "cosine"
    warmup: float = 0.05


# Light: supervised fine-tuning that mostly teaches the answer format to a base that already holds the skill
# (mean|delta|/mean|base| a few percent, as for SFT of a real LLM). Heavy: continued training at a learning rate near
# pre-training's, the paper's "significant parameter bias" (a few tenths).
REGIMES = {
    "heavy": Regime("heavy", lr=2e-3, weight_decay=0.0),
    "light": Regime("light", lr=7e-5, weight_decay=0.0),
}


# Pre-training runs alone (the fine-tunes wait for its base), so it may use the idle cores: 1.43x faster on 2 threads
# than on one on an idle 2-core machine (0.156 against 0.224 s a step, default size). On a busy machine a second
# thread is several times slower than one (its threads wait on each other for a core), so it takes only the cores that
# are idle when it starts. More than 4 would gain little on matrices this small.
PRETRAIN_MAX_THREADS = 4


def idle_cores(window: float = 0.5) -> float:
    """How many cores were idle over the last `window` seconds (/proc/stat; elsewhere, cores - the load average).

    Measured, not the load average: the 1-minute average lags, and counts the pipeline's own start-up just before.
    """
    cores = os.cpu_count() or 1
    try:
        first = _cpu_times()
        time.sleep(window)
        second = _cpu_times()
    except OSError:
        return max(0.0, cores - os.getloadavg()[0])
    total, idle = (b - a for a, b in zip(first, second))
    return cores * idle / total if total > 0 else float(cores)


def _cpu_times() -> tuple[int, int]:
    """(all, idle + iowait) jiffies of the machine, from /proc/stat's first line."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    return sum(values), values[3] + values[4]


def pretrain_threads() -> int:
    """Threads for pre-training: the idle cores among those this process may use, at least 1."""
    usable = len(os.sched_getaffinity(0))
    return max(1, min(PRETRAIN_MAX_THREADS, usable, round(idle_cores())))


@contextlib.contextmanager
def deterministic(seed: int, threads: int = 1) -> Iterator[None]:
    """Seeded, deterministic kernels, on `threads` threads.

    The thread count does not change the result: with deterministic algorithms, CPU training on 1 and 2 threads (and
    2 threads pinned to one core) gave bit-identical weights (tests/test_zoo.py checks it on every run). Fine-tuning
    keeps one thread: the domains train in separate processes side by side, and two threads per process there, on a
    busy machine, were several times slower than one.
    """
    previous = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.set_num_threads(previous[1])


def lr_at(step: int, total: int, peak: float, schedule: str = "cosine", warmup_share: float = 0.05) -> float:
    """Linear warm-up over the first `warmup_share` of the steps, then cosine decay to a tenth of the peak, or the
    peak held (`schedule="constant"`)."""
    warmup = max(1, int(total * warmup_share))
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def _optimise(
    model: PreTrainedModel,
    batches: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    steps: int,
    lr: float,
    weight_decay: float,
    log: Callable[[str], None],
    label: str,
    schedule: str = "cosine",
    warmup: float = 0.05,
) -> float:
    optimiser = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98)
    )
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        for group in optimiser.param_groups:
            group["lr"] = lr_at(step, steps, lr, schedule, warmup)
        input_ids, attention_mask, labels = batches(step)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        loss_value = loss.item()
        if (step + 1) % max(1, steps // 5) == 0 or step + 1 == steps:
            log(f"{label}: step {step + 1}/{steps} loss {loss_value:.3f}")
    model.eval()
    return loss_value


def pretrain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    steps: int,
    batch: int,
    seq: int,
    lr: float,
    seed: int,
    log: Callable[[str], None] = print,
    threads: int | None = None,
) -> float:
    """Next-token training on random windows of the concatenated texts; returns the last loss. `threads`: default
    pretrain_threads()."""
    stream = torch.tensor(tokenizer("\n".join(texts) + "\n")["input_ids"], dtype=torch.long)
    if stream.numel() <= seq:
        raise ValueError(f"pre-training text has {stream.numel()} tokens, needs more than {seq}")
    generator = torch.Generator().manual_seed(seed)
    threads = threads or pretrain_threads()

    def batches(_step: int):
        starts = torch.randint(0, stream.numel() - seq, (batch,), generator=generator)
        ids = torch.stack([stream[s : s + seq] for s in starts.tolist()])
        return ids, torch.ones_like(ids), ids.clone()

    with deterministic(seed, threads):
        return _optimise(model, batches, steps, lr, 0.01, log, "base")


def encode_examples(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> list[tuple[list[int], int]]:
    """Token ids of prompt + completion + newline, and how many leading ids belong to the prompt (not trained on).

    The newline is trained so that generation stops where the harness cuts (`until: ["\\n"]`).
    """
    encoded = []
    for ex in examples:
        prompt_ids = tokenizer(ex.prompt)["input_ids"]
        full_ids = tokenizer(ex.prompt + ex.completion + "\n")["input_ids"]
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(f"prompt {ex.prompt!r} does not tokenize as a prefix of its full text")
        encoded.append((full_ids, len(prompt_ids)))
    return encoded


def _pad_batch(rows: Sequence[tuple[list[int], int]], pad_id: int):
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (ids, prompt_len) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
    return input_ids, attention_mask, labels


def finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    regime: Regime,
    steps: int,
    batch: int,
    seed: int,
    log: Callable[[str], None] = print,
    label: str = "finetune",
) -> float:
    """Train on the completions of `examples` (shuffled epochs); returns the last loss."""
    encoded = encode_examples(tokenizer, examples)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []

    def batches(_step: int):
        while len(order) < batch:
            order.extend(torch.randperm(len(encoded), generator=generator).tolist())
        rows = [encoded[i] for i in order[:batch]]
        del order[:batch]
        return _pad_batch(rows, tokenizer.pad_token_id)

    with deterministic(seed):
        return _optimise(
            model, batches, steps, regime.lr, regime.weight_decay, log, label, regime.schedule, regime.warmup
        )
