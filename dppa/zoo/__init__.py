"""The demo zoo: small LLaMA-architecture models built locally (a base and one fine-tune per synthetic domain).

`build.build_zoo` (CLI: `dppa zoo`) builds it; `domains` defines the data, `tasks` the matching lm-eval tasks.
"""
