"""General synthetic text for pre-training the zoo's base model.

Simple sentences about everyday things, with numbers, colours and spelled-out words, so the base knows the
tokens the domains use without ever seeing a domain's task (no sums, no fact table, no reversal).
"""

from __future__ import annotations

import random

NAMES = ["tom", "ann", "sam", "lia", "ben", "eva", "max", "ida", "leo", "mia"]
NOUNS = ["cat", "dog", "box", "tree", "house", "bird", "car", "book", "apple", "stone", "river", "lamp", "boat", "cup"]
ADJECTIVES = ["small", "big", "old", "new", "red", "green", "blue", "white", "black", "pink", "brown", "grey", "happy"]
VERBS = ["sees", "likes", "finds", "moves", "paints", "carries", "opens", "draws", "keeps", "wants"]
PLACES = ["near the river", "in the house", "under the tree", "on the hill", "at the market", "in the garden"]


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("x", "s")) else "s")


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(6)
    name, noun, adj = rng.choice(NAMES), rng.choice(NOUNS), rng.choice(ADJECTIVES)
    if kind == 0:
        return f"{name} {rng.choice(VERBS)} the {adj} {noun} {rng.choice(PLACES)}."
    if kind == 1:
        count = rng.randint(2, 999)
        return f"there are {count} {adj} {_plural(noun)} {rng.choice(PLACES)}."
    if kind == 2:
        return f"the {noun} is {adj} and the {rng.choice(NOUNS)} is {rng.choice(ADJECTIVES)}."
    if kind == 3:
        return f"the word {noun} is spelled {' '.join(noun)}."
    if kind == 4:
        return f"in {rng.randint(1900, 2099)} {name} had {rng.randint(1, 99)} {_plural(noun)}."
    return f"{name} and {rng.choice(NAMES)} {rng.choice(VERBS).removesuffix('s')} a {adj} {noun}."


def general_text(seed: int, count: int) -> list[str]:
    """`count` sentences, the same ones for the same seed."""
    rng = random.Random(f"corpus-{seed}")
    return [_sentence(rng) for _ in range(count)]
