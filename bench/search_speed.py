"""Candidates per minute of the amplification search, and the share of a candidate's time outside forward passes.

Builds the tiny zoo (or uses --zoo), extracts one fine-tune's delta and runs `search_amplification` with a fresh
evaluation cache, so every candidate is evaluated for real. The model class's ``forward`` is wrapped with a timer:
"forward" is the time inside the model's forward passes (generation included), everything else in a candidate
(harness setup, tokenisation, building the weights) is overhead.

    python bench/search_speed.py --candidates 6 --limit 32
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path


def timed_forward(cls, clock: list[float], scoring: list[bool]):
    """Adds the time of each call of ``cls.forward`` made while a candidate is scored to ``clock[0]`` (the
    evaluator's setup, which checks its generation loop against the harness's, is not a candidate's time)."""
    original = cls.forward

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            if scoring[0]:
                clock[0] += time.perf_counter() - t0

    cls.forward = forward


def flag_scoring(evaluator_cls, scoring: list[bool]):
    original = evaluator_cls.scores

    @functools.wraps(original)
    def scores(self):
        scoring[0] = True
        try:
            return original(self)
        finally:
            scoring[0] = False

    evaluator_cls.scores = scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default=None, help="a zoo folder (default: build the tiny zoo in a temporary one)")
    parser.add_argument("--domain", default="facts")
    parser.add_argument("--candidates", type=int, default=6, help="pattern-search budget (all evaluated for real)")
    parser.add_argument("--limit", type=int, default=32, help="validation examples per task")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import transformers

    from dppa.evaluation.harness import Evaluator
    from dppa.extract import extract_delta
    from dppa.search.runner import search_amplification

    work = Path(tempfile.mkdtemp(prefix="search_speed_"))
    zoo = Path(args.zoo) if args.zoo else work / "zoo"
    if not args.zoo:
        from dppa.zoo.build import build_zoo

        build_zoo(zoo, size="tiny", regime="heavy", seed=0, workers=1, log=lambda _m: None)
    architecture = json.loads((zoo / "base" / "config.json").read_text())["architectures"][0]
    clock, scoring = [0.0], [False]
    timed_forward(getattr(transformers, architecture), clock, scoring)
    flag_scoring(Evaluator, scoring)
    delta = extract_delta(zoo / "base", zoo / args.domain, work / "delta", progress=False)
    reference = work / "reference.json"
    reference.write_text(json.dumps({f"zoo_{args.domain}": {"exact_match": 1.0}}))

    started = time.perf_counter()
    report = search_amplification(
        zoo / "base",
        delta,
        work / "amplified",
        tasks=[f"zoo_{args.domain}"],
        reference=reference,
        strategy="pattern",
        budget=args.candidates,
        limit=args.limit,
        batch_size=args.batch_size,
        cache=work / "cache.jsonl",
        device="cpu",
        progress=False,
        log=lambda _m: None,
    )
    wall = time.perf_counter() - started
    candidate_s = sum(t.build_s + t.evaluate_s for t in report.timings)
    n = len(report.timings)
    print(f"candidates evaluated: {n}, limit {args.limit} examples, batch {args.batch_size}")
    print(f"search wall time: {wall:.1f} s (setup {report.setup_s:.1f} s, writing the output included)")
    print(f"per candidate: {candidate_s / n:.2f} s -> {60 * n / candidate_s:.1f} candidates per minute")
    build_s = sum(t.build_s for t in report.timings)
    print(
        f"forward passes: {clock[0]:.2f} s of {candidate_s:.2f} s candidate time; "
        f"not forward: {1 - clock[0] / candidate_s:.1%} (setting the weights {build_s / candidate_s:.1%}, "
        f"the rest of the evaluation {(candidate_s - build_s - clock[0]) / candidate_s:.1%})"
    )


if __name__ == "__main__":
    main()
