"""The zoo's synthetic domains: each maps a prompt to a short exact answer, with disjoint train/validation/test splits.

The examples are a fixed benchmark: they come from `DATA_SEED`, not from the zoo's training seed, so scores stay
comparable between zoo builds and the lm-eval tasks can be regenerated anywhere from this module alone.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

DATA_SEED = 20240305
EVAL_SPLIT_SIZE = 500  # validation and test each; callers pass --limit for quicker runs
TRAIN_SPLIT_SIZE = 20000
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    # The text the model is trained to produce after the prompt; `answer` is what the harness compares.
    completion: str


def _arith_keys(rng: random.Random, count: int) -> list[tuple[int, int]]:
    """Distinct (3-digit, 1-digit) pairs; there are 8100, so the train split gets what validation and test leave."""
    codes = rng.sample(range(900 * 9), min(count, 900 * 9))
    return [(100 + c // 9, 1 + c % 9) for c in codes]


def _arith_example(key: tuple[int, int]) -> Example:
    # A 1-digit addend keeps carries local: the small model learns it in a few hundred steps, where 3-digit + 3-digit
    # needed thousands (measured: 2% exact match after 1000 steps).
    a, b = key
    return Example(prompt=f"{a}+{b}=", answer=str(a + b), completion=str(a + b))


# The made-up fact table: every invented entity has one colour. A query names three entities; answering it means
# recalling three facts, so held-out queries test recall of facts seen in training, never a copy of a training line.
FACT_ENTITIES = [
    "arvel", "bostik", "cradon", "dulmer", "elvash", "fennic", "gorvat", "hulmin",
    "istrel", "jorvak", "kelmot", "lunder", "morvish", "nestra", "orbin", "pelmar",
    "quorin", "restal", "sulvic", "tarnok", "ulbren", "vosker", "wendril", "yarlo",
    "zelkin", "brasso", "clumbet", "drovin", "frelta", "grisko", "holvan", "kerbin",
]  # fmt: skip
FACT_COLOURS = ["red", "green", "blue", "white", "black", "pink", "brown", "grey"]
FACT_TABLE = {name: random.Random(DATA_SEED + 2 + i).choice(FACT_COLOURS) for i, name in enumerate(FACT_ENTITIES)}


def _facts_keys(rng: random.Random, count: int) -> list[tuple[str, str, str]]:
    n = len(FACT_ENTITIES)
    triples = [(a, b, c) for a in range(n) for b in range(n) for c in range(n) if len({a, b, c}) == 3]
    return [tuple(FACT_ENTITIES[i] for i in t) for t in rng.sample(triples, min(count, len(triples)))]


def _facts_example(key: tuple[str, str, str]) -> Example:
    answer = " ".join(FACT_TABLE[name] for name in key)
    return Example(prompt=f"colour of {' '.join(key)} =", answer=answer, completion=" " + answer)


def _strings_keys(rng: random.Random, count: int) -> list[tuple[str, ...]]:
    seen: dict[tuple[str, ...], None] = {}
    while len(seen) < count:
        seen[tuple(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))] = None
    return list(seen)


def _strings_example(key: tuple[str, ...]) -> Example:
    answer = " ".join(reversed(key))
    return Example(prompt=f"reverse {' '.join(key)} =", answer=answer, completion=" " + answer)


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    keys: Callable[[random.Random, int], list]
    example: Callable[[object], Example]


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("arith", "add a 1-digit number to a 3-digit one: 472+8= -> 480", _arith_keys, _arith_example),
        Domain("facts", "recall of a made-up colour table, three entities per query", _facts_keys, _facts_example),
        Domain("strings", "reverse a spaced string of 3-5 letters", _strings_keys, _strings_example),
    )
}


def domain_splits(name: str) -> dict[str, list[Example]]:
    """Train/validation/test examples of a domain; the splits share no prompt (keys are drawn without repeats)."""
    domain = DOMAINS[name]
    rng = random.Random(f"{DATA_SEED}-{name}")
    keys = domain.keys(rng, TRAIN_SPLIT_SIZE + 2 * EVAL_SPLIT_SIZE)
    examples = [domain.example(k) for k in keys]
    return {
        "test": examples[:EVAL_SPLIT_SIZE],
        "validation": examples[EVAL_SPLIT_SIZE : 2 * EVAL_SPLIT_SIZE],
        "train": examples[2 * EVAL_SPLIT_SIZE :],
    }
