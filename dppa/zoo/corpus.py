"""Pre-training text of the zoo's base: everyday sentences mixed with the domains' skills inside running text.

A capable LLM has seen sums, facts and spelling games on the web before anyone fine-tunes it; the zoo's base sees
them too. Each skill sentence holds a domain example in the exact layout of its task prompt ("so 472+8=480 is
true.", "colour of kelmot clumbet tarnok = black brown blue, the book says.") but never ends at the answer: the
text always runs on. So the base holds each skill yet does not answer a bare prompt with the answer alone and a
newline, which is what a task scores; a light fine-tune then only has to teach that format, as supervised
fine-tuning of a real LLM mostly does. (A probe found the exact layout decisive: with the skills only in other
wordings, "472 plus 8 makes 480.", light fine-tunes did not learn arithmetic and merges collapsed.)

Skill sentences draw only on the train split of each domain: validation and test prompts never occur in the text.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from dppa.zoo.domains import FACT_TABLE, Example, domain_splits

NAMES = ["tom", "ann", "sam", "lia", "ben", "eva", "max", "ida", "leo", "mia"]
NOUNS = ["cat", "dog", "box", "tree", "house", "bird", "car", "book", "apple", "stone", "river", "lamp", "boat", "cup"]
ADJECTIVES = ["small", "big", "old", "new", "red", "green", "blue", "white", "black", "pink", "brown", "grey", "happy"]
VERBS = ["sees", "likes", "finds", "moves", "paints", "carries", "opens", "draws", "keeps", "wants"]
PLACES = ["near the river", "in the house", "under the tree", "on the hill", "at the market", "in the garden"]


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("x", "s")) else "s")


def _everyday(rng: random.Random) -> str:
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


# Each skill template puts "<prompt><completion>" (the task's exact layout) inside a sentence that runs on after
# the answer; some start with the prompt, as an evaluation context does, some have it mid-sentence.
_ARITH = [
    "so {text} is true.",
    "{text} is what {name} wrote on the {noun}.",
    "{name} says that {text} and the {noun} is {adj}.",
    "we know {text}, said {name}.",
]
_FACTS = [
    "{text}, says the old book.",
    "{name} asked for the {text} and so on.",
    "in the table {text} is written.",
    "{text} is what {name} found.",
]
_STRINGS = [
    "{text} is what {name} wrote.",
    "{name} said {text} to the {noun}.",
    "so {text} in the game.",
    "the game: {text} and done.",
]


def _fill(template: str, rng: random.Random, text: str) -> str:
    return template.format(text=text, name=rng.choice(NAMES), noun=rng.choice(NOUNS), adj=rng.choice(ADJECTIVES))


def _arith_words(rng: random.Random, ex: Example) -> str:
    a, b = ex.prompt.removesuffix("=").split("+")
    return f"{a} plus {b} makes {ex.answer}."


def _facts_words(rng: random.Random, ex: Example) -> str:
    name = rng.choice(ex.prompt.removeprefix("colour of ").removesuffix(" =").split())
    return f"the {name} is {FACT_TABLE[name]}."


def _strings_words(rng: random.Random, ex: Example) -> str:
    letters = ex.prompt.removeprefix("reverse ").removesuffix(" =")
    return f"{letters} backwards is {ex.answer}."


SKILLS: dict[str, tuple[list[str], Callable[[random.Random, Example], str]]] = {
    "arith": (_ARITH, _arith_words),
    "facts": (_FACTS, _facts_words),
    "strings": (_STRINGS, _strings_words),
}
LAYOUT_SHARE = 0.8  # of skill sentences: the task's own layout; the rest say the same thing in other words
# How often each skill comes up: addition with carries takes a small model the most examples, a 32-entry table the
# fewest.
SKILL_WEIGHTS = {"arith": 3, "strings": 2, "facts": 1}


def _skill(rng: random.Random, domain: str, examples: list[Example]) -> str:
    templates, words = SKILLS[domain]
    ex = rng.choice(examples)
    if rng.random() < LAYOUT_SHARE:
        return _fill(rng.choice(templates), rng, ex.prompt + ex.completion)
    return words(rng, ex)


def pretraining_text(seed: int, count: int, skill_share: float) -> list[str]:
    """`count` sentences: everyday ones, and a `skill_share` of them (in expectation) showing a domain skill,
    the domains drawn by `SKILL_WEIGHTS`; the same ones for the same seed."""
    rng = random.Random(f"pretrain-corpus-{seed}")
    train = {d: domain_splits(d)["train"] for d in SKILLS}
    domains, weights = list(SKILL_WEIGHTS), list(SKILL_WEIGHTS.values())
    out = []
    for _ in range(count):
        if rng.random() < skill_share:
            domain = rng.choices(domains, weights)[0]
            out.append(_skill(rng, domain, train[domain]))
        else:
            out.append(_everyday(rng))
    return out
