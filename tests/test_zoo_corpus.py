"""The base's pre-training text: the domains' skills in the tasks' own layout, never a held-out prompt, never a
bare answer line."""

import re

from dppa.zoo.corpus import pretraining_text
from dppa.zoo.domains import DOMAINS, FACT_TABLE, domain_splits

TEXT = pretraining_text(0, 3000, 0.5)


def test_same_seed_same_text_and_share_of_skills():
    assert pretraining_text(0, 200, 0.5) == TEXT[:200]
    assert pretraining_text(1, 200, 0.5) != TEXT[:200]
    layouts = [s for s in TEXT if re.search(r"\d+\+\d=\d+|colour of .* =|reverse .* =", s)]
    assert 0.3 < len(layouts) / len(TEXT) < 0.45  # half are skill sentences, three quarters of those in task layout


def test_skills_appear_in_the_exact_prompt_layout_and_are_right():
    joined = "\n".join(TEXT)
    for a, b, total in re.findall(r"(\d{3})\+(\d)=(\d+)", joined):
        assert int(a) + int(b) == int(total)
    for names, colours in re.findall(r"colour of ([a-z]+ [a-z]+ [a-z]+) = ([a-z]+ [a-z]+ [a-z]+)", joined):
        assert colours.split() == [FACT_TABLE[n] for n in names.split()]
    for letters, answer in re.findall(r"reverse ((?:[a-z] )+)= ((?:[a-z] )*[a-z])\b", joined):
        assert answer.split() == letters.split()[::-1]
    assert all(d in joined for d in ("+", "colour of", "reverse"))


def _prompts(sentence):
    """Every domain prompt a sentence shows, in the task layout or in other words."""
    found = re.findall(r"(?<!\d)\d{3}\+\d=", sentence)
    found += [f"{a}+{b}=" for a, b in re.findall(r"(\d{3}) plus (\d) makes", sentence)]
    found += re.findall(r"colour of [a-z]+ [a-z]+ [a-z]+ =", sentence)
    found += re.findall(r"reverse (?:[a-z] )+=", sentence)
    found += [f"reverse {letters}=" for letters in re.findall(r"^((?:[a-z] )+)backwards", sentence)]
    return found


def test_no_held_out_prompt_and_no_line_ends_at_an_answer():
    held_out = {e.prompt for d in DOMAINS for split in ("validation", "test") for e in domain_splits(d)[split]}
    train = {e.prompt: e.prompt + e.completion for d in DOMAINS for e in domain_splits(d)["train"]}
    shown = [p for sentence in TEXT for p in _prompts(sentence)]
    assert len(shown) > 1000
    assert not held_out.intersection(shown)
    assert set(shown) <= set(train)
    # The text always runs on after an answer: no sentence ends with "<prompt><completion>".
    for sentence in TEXT:
        assert not any(sentence.rstrip(".").endswith(train[p]) for p in _prompts(sentence))
