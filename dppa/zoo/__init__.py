"""The demo zoo: small LLaMA-architecture models built locally (a base and one fine-tune per synthetic domain).

`build.build_zoo` (CLI: `dppa zoo`) builds it; `domains` defines the data, `tasks` the matching lm-eval tasks,
`corpus` the base's pre-training text, `check` (scripts/check_zoo.py) the targets a built zoo must meet.

Like a real LLM, the base already holds each domain's skill from pre-training (`corpus`: the skills appear inside
running text, in the tasks' own prompt layout, on train-split examples only) but does not answer a bare prompt in
the task's format, so it scores about 0. A light fine-tune (supervised fine-tuning) then mostly teaches the format
and moves the weights by a few percent; a heavy one (continued training at a large learning rate) moves them by
about a third, the paper's case of fine-tunes far from their base.
"""
