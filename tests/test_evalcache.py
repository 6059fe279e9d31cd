"""The evaluation cache: keys, persistence, crash and concurrency safety, and a search rerun that evaluates nothing."""

import json
import math
from concurrent.futures import ProcessPoolExecutor
from functools import partial

import pytest

from dppa.evaluation.cache import CachedEvaluator, EvalCache, eval_key, harness_version
from dppa.evaluation.objective import normalised_score
from dppa.search.registry import STRATEGIES
from dppa.zoo.tasks import data_fingerprint

# One search's keys: everything fixed but the factors.
KEY = partial(
    eval_key,
    model=("d" * 64,),
    base="b" * 64,
    tasks=("zoo_arith", "zoo_facts"),
    split="validation",
    limit=20,
    recipe={"densities": [0.1, 0.2], "lamda": 0.08},
    compute="float32",
)


def test_harness_version_names_the_installed_lm_eval():
    import lm_eval

    assert harness_version() == f"lm-eval {lm_eval.__version__}"
    assert KEY(factors=(1.8, 1.0)).harness == harness_version()


def test_zoo_task_keys_record_the_task_data_version():
    assert KEY().to_dict()["task_data"] == {"zoo_data": data_fingerprint()}
    assert (
        eval_key(model="m", tasks=["hellaswag"], split="test", limit=None, recipe={}, compute="saved").to_dict()[
            "task_data"
        ]
        == {}
    )


def test_key_ignores_float_noise_and_task_order():
    key = KEY(factors=(1.8, 1.0))
    assert KEY(factors=(0.1 * 18, 1.0)).digest() == key.digest()
    assert KEY(factors=(1.8, -0.0)).digest() == KEY(factors=(1.8, 0.0)).digest()
    assert KEY(factors=(1.8, 1.0), tasks=("zoo_facts", "zoo_arith")).digest() == key.digest()


@pytest.mark.parametrize(
    "change",
    [
        {"factors": (1.8, 1.1)},
        {"model": ("e" * 64,)},
        {"base": "c" * 64},
        {"tasks": ("zoo_arith",)},
        {"task_data": {"zoo_data": "an older fingerprint"}},
        {"split": "test"},
        {"limit": None},
        {"harness": "lm-eval 0.4.14"},
        {"compute": "saved"},
        {"recipe": {"densities": [0.1, 0.3], "lamda": 0.08}},
    ],
    ids=lambda change: next(iter(change)),
)
def test_changing_any_one_part_misses_the_cache(tmp_path, change):
    cache = EvalCache(tmp_path / "c.jsonl")
    cache.put(KEY(factors=(1.8, 1.0)), {"zoo_arith": {"acc": 0.5}})
    assert cache.get(KEY(factors=(1.8, 1.0))) == {"zoo_arith": {"acc": 0.5}}
    assert cache.get(KEY(**{"factors": (1.8, 1.0), **change})) is None


def test_hit_miss_and_persistence(tmp_path):
    path = tmp_path / "cache" / "scores.jsonl"
    cache = EvalCache(path)
    key = KEY(factors=(1.8, 1.0))
    assert cache.get(key) is None
    cache.put(key, {"zoo_arith": {"acc": 0.5}})
    assert cache.get(key) == {"zoo_arith": {"acc": 0.5}}
    assert cache.get(KEY(factors=(1.9, 1.0))) is None
    reopened = EvalCache(path)
    assert len(reopened) == 1
    assert reopened.get(key) == {"zoo_arith": {"acc": 0.5}}
    record = json.loads(path.read_text().splitlines()[0])
    assert record["fields"]["factors"] == [1.8, 1.0] and record["fields"]["split"] == "validation"
    with pytest.raises(ValueError):
        cache.put(key, None)


def test_nan_scores_round_trip(tmp_path):
    cache = EvalCache(tmp_path / "scores.jsonl")
    cache.put(KEY(factors=(1.8, 1.0)), {"acc_stderr": float("nan")})
    assert math.isnan(EvalCache(tmp_path / "scores.jsonl").get(KEY(factors=(1.8, 1.0)))["acc_stderr"])


def test_truncated_last_line_is_skipped_and_the_next_write_is_not_glued_to_it(tmp_path):
    path = tmp_path / "scores.jsonl"
    cache = EvalCache(path)
    first, second, third = (KEY(factors=(1.8, b)) for b in (0.0, 1.0, 1.1))
    cache.put(first, 0.1)
    cache.put(second, 0.2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 15])  # a crash in the middle of the second record's write
    after_crash = EvalCache(path)
    assert after_crash.get(first) == 0.1
    assert after_crash.get(second) is None
    after_crash.put(third, 0.3)
    reopened = EvalCache(path)
    assert (reopened.get(first), reopened.get(second), reopened.get(third)) == (0.1, None, 0.3)
    assert reopened.skipped_lines == 1


def _write_many(path, writer: int, count: int) -> None:
    cache = EvalCache(path)
    for i in range(count):
        cache.put(KEY(factors=(float(writer), i / 10)), {"writer": writer, "i": i, "pad": "x" * 3000})


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "scores.jsonl"
    reader = EvalCache(path)
    writers, count = 4, 40
    with ProcessPoolExecutor(max_workers=writers) as pool:
        list(pool.map(_write_many, [path] * writers, range(writers), [count] * writers))
    # The reader opened before the writes picks them up on a miss.
    assert reader.get(KEY(factors=(2.0, 3.9))) == {"writer": 2, "i": 39, "pad": "x" * 3000}
    reopened = EvalCache(path)
    assert len(reopened) == writers * count
    assert reopened.skipped_lines == 0


def _scores_of(factors):
    """A stand-in for an lm-eval run: per-task accuracies that peak at (2.1, 1.3)."""
    bump = math.exp(-((factors[0] - 2.1) ** 2) - (factors[1] - 1.3) ** 2)
    return {"zoo_arith": {"acc": 0.8 * bump}, "zoo_facts": {"acc": 0.6 * bump}}


REFERENCE = {"zoo_arith": 0.8, "zoo_facts": 0.6}


def _objective(evaluate):
    return lambda factors: normalised_score({t: m["acc"] for t, m in evaluate(factors).items()}, REFERENCE)


def _strategy(name):
    entry = STRATEGIES.get(name)
    return lambda objective: entry.impl(objective, 2, entry.options())


@pytest.mark.parametrize("search", [_strategy("coordinate"), _strategy("pattern")], ids=["coordinate", "pattern"])
def test_rerun_with_the_cache_present_evaluates_zero_candidates(tmp_path, search):
    path = tmp_path / "scores.jsonl"
    first = CachedEvaluator(_scores_of, EvalCache(path), KEY)
    first_result = search(_objective(first))
    assert first.real_evaluations == first_result.n_evals > 5
    assert first.hits == 0

    rerun = CachedEvaluator(_scores_of, EvalCache(path), KEY)
    rerun_result = search(_objective(rerun))
    assert rerun.real_evaluations == 0
    assert rerun.hits == first_result.n_evals
    assert rerun_result == first_result

    other_split = CachedEvaluator(_scores_of, EvalCache(path), partial(KEY, split="test"))
    search(_objective(other_split))
    assert other_split.real_evaluations == first_result.n_evals
