"""Candidates per minute of the amplification search, and the share of a candidate's time outside forward passes.

Builds the tiny zoo (or uses --zoo), extracts one fine-tune's delta and runs `search_amplification` with a fresh
evaluation cache, so every candidate is evaluated for real. A candidate's time is setting its weights
(``CandidateWeights.amplify``) plus scoring it (``Evaluator.scores``); the model class's ``forward`` is wrapped with a
timer, and "forward" is the time inside the model's forward passes while a candidate is scored (generation
included; the evaluator's setup is not a candidate's time). Everything else in a candidate is overhead.

Each figure is given twice: by the wall clock, and by the CPU time of this process (on a machine shared with other
jobs, wall time also counts the waits for a core, which fall on forward passes and overhead alike at random).

    python bench/search_speed.py --zoo data/models/zoo --candidates 20 --limit 64
    python bench/search_speed.py --zoo data/models/zoo --candidates 20 --limit 64 --at 98684b8   # an earlier dppa/

The last line is the search's path and scores: runs of two versions on the same inputs must print the same one.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

from runner import BENCH, REPO, snapshot, source_label

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class Clock:
    """Seconds spent in wrapped calls, by each clock in CLOCKS."""

    def __init__(self):
        self.total = dict.fromkeys(CLOCKS, 0.0)

    def wrap(self, owner, name: str, when: list[bool] | None = None, flag: list[bool] | None = None):
        """Time ``owner.name`` (only while ``when[0]``, if given); ``flag[0]`` is True during its calls."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            counting = when is None or when[0]
            if flag is not None:
                flag[0] = True
            start = {k: clock() for k, clock in CLOCKS.items()}
            try:
                return original(*args, **kwargs)
            finally:
                if counting:
                    for k, clock in CLOCKS.items():
                        self.total[k] += clock() - start[k]
                if flag is not None:
                    flag[0] = False

        setattr(owner, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default=None, help="a zoo folder (default: build the tiny zoo in a temporary one)")
    parser.add_argument("--domain", default="facts")
    parser.add_argument("--candidates", type=int, default=6, help="pattern-search budget (all evaluated for real)")
    parser.add_argument("--limit", type=int, default=32, help="validation examples per task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--at", help="a commit whose dppa/ to measure instead of the working tree's")
    args = parser.parse_args()
    src = snapshot(args.at, BENCH / "out" / "search_speed") if args.at else REPO
    sys.path.insert(0, str(src))  # before anything imports dppa

    import transformers

    from dppa.evaluation.harness import Evaluator
    from dppa.evaluation.weights import CandidateWeights
    from dppa.extract import extract_delta
    from dppa.search.runner import search_amplification

    work = Path(tempfile.mkdtemp(prefix="search_speed_"))
    zoo = Path(args.zoo) if args.zoo else work / "zoo"
    if not args.zoo:
        from dppa.zoo.build import build_zoo

        build_zoo(zoo, size="tiny", regime="heavy", seed=0, workers=1, log=lambda _m: None)
    architecture = json.loads((zoo / "base" / "config.json").read_text())["architectures"][0]
    forward, build, score = Clock(), Clock(), Clock()
    scoring = [False]
    forward.wrap(getattr(transformers, architecture), "forward", when=scoring)
    build.wrap(CandidateWeights, "amplify")
    score.wrap(Evaluator, "scores", flag=scoring)
    delta = extract_delta(zoo / "base", zoo / args.domain, work / "delta", progress=False)
    dense_scores = work / "dense_scores.json"
    dense_scores.write_text(json.dumps({f"zoo_{args.domain}": {"exact_match": 1.0}}))

    started = time.perf_counter()
    report = search_amplification(
        zoo / "base",
        delta,
        work / "amplified",
        tasks=[f"zoo_{args.domain}"],
        dense=dense_scores,
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
    n = len(report.timings)
    print(f"dppa at {source_label(src)}")
    print(f"candidates evaluated: {n}, limit {args.limit} examples, batch {args.batch_size}")
    print(f"search wall time: {wall:.1f} s (setup {report.setup_s:.1f} s, writing the output included)")
    for kind in CLOCKS:
        candidate_s = build.total[kind] + score.total[kind]
        outside = candidate_s - forward.total[kind]
        print(
            f"{kind:>4}: {candidate_s / n:.3f} s per candidate -> {60 * n / candidate_s:.0f} candidates per minute; "
            f"forward passes {forward.total[kind]:.2f} s of {candidate_s:.2f} s; not forward: "
            f"{outside / candidate_s:.1%} (setting the weights {build.total[kind] / candidate_s:.1%}, "
            f"the rest of the evaluation {(score.total[kind] - forward.total[kind]) / candidate_s:.1%})"
        )
    # the search's path and scores, to compare runs of different code on the same inputs
    print("trace:", json.dumps([[*ev.factors, ev.score] for ev in report.result.trace]))


if __name__ == "__main__":
    main()
