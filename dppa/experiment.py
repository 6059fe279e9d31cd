"""The paper's comparison on the demo zoo (issue 5): pruning methods per fine-tune, then merging all fine-tunes.

    python -m dppa.experiment experiments/paper.yaml

Per regime (heavy, light) it builds the zoo if missing, extracts each fine-tune's delta, prunes it with magnitude,
DARE and DP at each density, searches DPPA's band factors on the validation split, merges all fine-tunes with each
method combination, and scores everything on the test split. Outputs: Markdown and CSV tables, and a JSON summary.

Resumable: artifacts are written atomically by the engine and reused when their manifest says they were made from
the same inputs with the same settings; every score goes through the evaluation cache, so a rerun after an
interruption only does what is missing. Models are scored in memory: one base model is loaded per regime and its
weights are set to each variant in turn (base + delta, or a merged model's weights).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dppa.errors import DppaError
from dppa.evaluation.cache import EvalCache, EvalContext
from dppa.extract import extract_delta
from dppa.io.manifest import read_manifest
from dppa.io.reader import open_checkpoint
from dppa.merging.merge import merge_deltas
from dppa.search.runner import (
    SearchSettings,
    checkpoint_hash,
    load_model,
    primary_scores,
    recorded_hash,
    rows_to_csv,
    search_amplification,
    task_data_versions,
    write_text_atomic,
)
from dppa.sparsify.bands import check_bands
from dppa.sparsify.prune import prune_delta

PRUNE_METHODS = ("magnitude", "dare", "dp")
MERGE_COMBOS = ("dense+task_arithmetic", "dense+ties", "dare+task_arithmetic", "dare+ties", "dp+ties",
                "dppa+task_arithmetic", "dppa+ties")
METHOD_LABEL = {"magnitude": "Magnitude", "dare": "DARE", "dp": "DP", "dppa": "DPPA", "dense": "dense"}
MERGE_LABEL = {"task_arithmetic": "task arithmetic", "ties": "TIES"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Regime(Strict):
    zoo: Path  # zoo folder; built with `size` and this regime's name when missing
    size: Literal["tiny", "default"] = "default"
    seed: int = 0


class Evaluate(Strict):
    split: Literal["test"] = "test"
    limit: int | None = Field(100, gt=0)
    batch_size: int = Field(64, gt=0)
    threads: int | None = Field(None, gt=0)  # torch intra-op threads; None leaves torch's default


class Prune(Strict):
    methods: list[Literal["magnitude", "dare", "dp"]] = list(PRUNE_METHODS)
    densities: list[float] = [0.1, 0.2, 0.5]
    seed: int = 0


class Search(Strict):
    strategy: Literal["coordinate", "reference", "pattern"] = "coordinate"
    limit: int | None = Field(100, gt=0)
    budget: int | None = Field(None, gt=0)
    # more strategies, each run per fine-tune with the budget the main strategy used there (an extra table column)
    compare: list[Literal["coordinate", "pattern"]] = []


class Dppa(Strict):
    densities: list[float] = [0.1, 0.2]
    search: Search = Search()


class Merge(Strict):
    scale: float = 1.0
    density: float = 0.2  # TIES's trim of dense deltas, and the density of the DARE / DP deltas that are merged
    combos: list[str] = list(MERGE_COMBOS)


class ExperimentConfig(Strict):
    work: Path = Path("data/experiment")
    results: Path = Path("experiments/results")
    domains: list[str] = ["arith", "facts", "strings"]
    regimes: dict[Literal["heavy", "light"], Regime]
    evaluate: Evaluate = Evaluate()
    prune: Prune = Prune()
    dppa: Dppa = Dppa()
    merge: Merge = Merge()


def load_config(path: str | Path) -> ExperimentConfig:
    """The experiment's params, checked; relative paths are taken from the current folder (the repository root)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise DppaError(f"{path}: cannot read ({exc})") from None
    try:
        config = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise DppaError(f"{path}: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    for combo in config.merge.combos:
        if combo not in MERGE_COMBOS:
            raise DppaError(f"{path}: merge.combos: unknown {combo!r}; choose from {', '.join(MERGE_COMBOS)}")
    check_bands(config.dppa.densities)
    return config


def task_of(domain: str) -> str:
    return f"zoo_{domain}"


# ---------------------------------------------------------------------------------------------------------------------
# Artifacts: reuse what exists with the right manifest, else (re)build it atomically.


def manifest_value(manifest: dict, dotted: str):
    """The value at a dotted path; ``*`` maps over a list (``deltas.*.content_hash``); None when absent."""
    node = manifest
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if part == "*":
            rest = ".".join(parts[i + 1:])
            return [manifest_value(item, rest) for item in node] if isinstance(node, list) else None
        node = node.get(part) if isinstance(node, dict) else None
    return node


def manifest_matches(folder: Path, expected: dict) -> bool:
    """True when ``folder`` exists and its manifest has every expected value."""
    if not folder.exists():
        return False
    manifest = read_manifest(folder)
    return all(manifest_value(manifest, key) == value for key, value in expected.items())


def ensure(folder: Path, expected: dict, build: Callable[[Path], object], log: Callable[[str], None]) -> str:
    """Build ``folder`` unless it already holds the expected artifact; returns its content hash."""
    if manifest_matches(folder, expected):
        log(f"  reuse {folder}")
    else:
        started = time.perf_counter()
        build(folder)
        log(f"  built {folder} ({time.perf_counter() - started:.1f}s)")
    return read_manifest(folder)["content_hash"]


def ensure_zoo(regime_name: str, regime: Regime, log) -> Path:
    from dppa.zoo.build import MANIFEST, build_zoo

    manifest_path = regime.zoo / MANIFEST
    if not manifest_path.exists():
        log(f"building the {regime.size} zoo ({regime_name}) at {regime.zoo}")
        build_zoo(regime.zoo, size=regime.size, regime=regime_name, seed=regime.seed, overwrite=regime.zoo.exists(),
                  log=lambda m: log(f"  {m}"))
    zoo = json.loads(manifest_path.read_text())
    found = (zoo.get("size"), zoo.get("regime", {}).get("name"), zoo.get("seed"))
    if found != (regime.size, regime_name, regime.seed):
        raise DppaError(f"{manifest_path}: the zoo there is size/regime/seed {found}, the experiment wants "
                        f"{(regime.size, regime_name, regime.seed)}; point regimes.{regime_name}.zoo elsewhere")
    return regime.zoo


# ---------------------------------------------------------------------------------------------------------------------
# Scoring variants in memory.


class VariantModel:
    """One loaded base model whose weights are set to base + a delta folder, or to a model folder's weights."""

    def __init__(self, base: Path, device: torch.device):
        self.model, self.tokenizer = load_model(base, device)
        self.params = dict(self.model.named_parameters())
        self.base = {name: p.detach().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def set_weights(self, folder: Path, *, is_delta: bool) -> None:
        reader = open_checkpoint(folder)
        names = set(reader.names())
        unknown = names - set(self.params)
        missing = set() if is_delta else set(self.params) - names
        if unknown or missing:
            raise DppaError(f"{folder}: tensors do not match the base model's parameters "
                            f"(e.g. {sorted(unknown or missing)[0]!r})")
        for name, param in self.params.items():
            if name not in names:
                param.copy_(self.base[name])
                continue
            values = reader.get(name, dtype=torch.float32).to(param.device)
            param.copy_(values.add_(self.base[name]) if is_delta else values)

    @torch.no_grad()
    def restore(self) -> None:
        for name, param in self.params.items():
            param.copy_(self.base[name])


class Scorer:
    """Test scores of artifacts through the evaluation cache, keyed by the artifact's content hash."""

    def __init__(self, variants: VariantModel, cache: EvalCache, base_hash: str, settings: Evaluate, log):
        self.variants, self.cache, self.base_hash, self.settings, self.log = variants, cache, base_hash, settings, log
        self.real_evaluations = 0
        self.evaluate_s = 0.0

    def score(self, folder: Path | None, content_hash: str, tasks: list[str], *, is_delta: bool) -> dict[str, float]:
        """{task: primary metric} of base + delta ``folder`` (is_delta) or of the model ``folder``; None = the base."""
        recipe = {"candidate": "delta" if is_delta else "model-folder", "dtype": "float32", **task_data_versions(tasks)}
        key = EvalContext(deltas=(content_hash,), base=self.base_hash, tasks=tuple(tasks), split=self.settings.split,
                          limit=self.settings.limit, recipe=recipe).key(())
        scores = self.cache.get(key)
        if scores is None:
            scores = self._evaluate(folder, tasks, is_delta)
            self.cache.put(key, scores)
        return primary_scores(scores)

    def _evaluate(self, folder: Path | None, tasks: list[str], is_delta: bool) -> dict:
        from dppa.evaluation.harness import evaluate_model

        started = time.perf_counter()
        try:
            if folder is not None:
                self.variants.set_weights(folder, is_delta=is_delta)
            scores = evaluate_model(self.variants.model, self.variants.tokenizer, tasks, split=self.settings.split,
                                    limit=self.settings.limit, batch_size=self.settings.batch_size)
        finally:
            self.variants.restore()
        elapsed = time.perf_counter() - started
        self.real_evaluations += 1
        self.evaluate_s += elapsed
        self.log(f"  scored {folder or 'base'}: {primary_scores(scores)} ({elapsed:.1f}s)")
        return scores


# ---------------------------------------------------------------------------------------------------------------------
# One regime: artifacts, scores, table rows.


class RegimeRun:
    """Builds and scores one regime's artifacts under ``work/<regime>``; collects long-format result rows."""

    def __init__(self, config: ExperimentConfig, name: str, cache_path: Path, device: torch.device, log):
        self.config, self.name, self.cache_path, self.device, self.log = config, name, cache_path, device, log
        self.work = config.work / name
        self.zoo = ensure_zoo(name, config.regimes[name], log)
        self.base = self.zoo / "base"
        self.base_hash = checkpoint_hash(self.base)
        self.deltas: dict[str, Path] = {}
        self.hashes: dict[Path, str] = {}  # artifact folder -> content hash
        self.searches: dict[str, dict] = {}
        self.scorer: Scorer | None = None

    # -- artifacts --------------------------------------------------------------------------------------------------

    def _ensure(self, folder: Path, expected: dict, build: Callable[[Path], object]) -> Path:
        self.hashes[folder] = ensure(folder, expected, build, self.log)
        return folder

    def delta(self, domain: str) -> Path:
        if domain not in self.deltas:
            ft = self.zoo / domain
            ft_hash = checkpoint_hash(ft)
            self.hashes[ft] = ft_hash
            expected = {"kind": "delta", "dtype": "float32", "base.content_hash": self.base_hash,
                        "finetuned.content_hash": ft_hash}
            self.deltas[domain] = self._ensure(
                self.work / "deltas" / domain, expected,
                lambda out: extract_delta(self.base, ft, out, dtype="float32", overwrite=True, progress=False))
        return self.deltas[domain]

    def pruned(self, domain: str, method: str, density: float) -> Path:
        delta = self.delta(domain)
        seed = self.config.prune.seed
        expected = {"kind": "pruned", "method": method, "density": density,
                    "source_delta.content_hash": self.hashes[delta], **({"seed": seed} if method == "dare" else {})}
        return self._ensure(
            self.work / "pruned" / f"{method}-{density:g}" / domain, expected,
            lambda out: prune_delta(delta, out, method=method, density=density, seed=seed, overwrite=True,
                                    progress=False))

    def amplified(self, domain: str, compare: str | None = None) -> Path:
        """DPPA with the main search strategy, or with strategy ``compare`` at the budget the main one used."""
        delta = self.delta(domain)
        search = self.config.dppa.search.strategies
        if compare is None:
            method, strategy, budget, name = "dppa", search.strategy, search.budget, domain
        else:
            main = self.searches.get(f"dppa/{domain}") or read_manifest(self.amplified(domain))["search"]
            method, strategy, budget, name = f"dppa:{compare}", compare, main["n_candidates"], f"{domain}_{compare}"
        settings = SearchSettings((task_of(domain),), strategy, tuple(self.config.dppa.densities), "validation",
                                  search.limit, budget)
        ft = self.zoo / domain
        # The fine-tune's hash as the search itself takes it (from the delta's manifest when it names this folder).
        ft_hash = recorded_hash(ft, read_manifest(delta).get("finetuned"))
        fingerprint = settings.fingerprint(self.hashes[delta], self.base_hash, ft_hash)

        def build(out: Path) -> None:
            search_amplification(self.base, delta, out, tasks=settings.tasks, reference=ft,
                                 strategy=settings.strategy, densities=settings.densities, limit=settings.limit,
                                 budget=settings.budget, cache=self.cache_path, device=str(self.device),
                                 trace=self.work / "plots" / f"search_{name}.csv", overwrite=True, progress=False,
                                 log=lambda m: self.log(f"    {m}"))

        folder = self._ensure(self.work / "amplified" / name, {"kind": "amplified", "search.fingerprint": fingerprint},
                              build)
        self.searches[f"{method}/{domain}"] = read_manifest(folder)["search"]
        return folder

    def dppa_methods(self) -> list[str]:
        return ["dppa"] + [f"dppa:{s}" for s in self.config.dppa.search.compare]

    def merge_inputs(self, kind: str) -> list[Path]:
        density = self.config.merge.density
        if kind == "dense":
            return [self.delta(d) for d in self.config.domains]
        if kind == "dppa":
            return [self.amplified(d) for d in self.config.domains]  # the main search strategy's
        return [self.pruned(d, kind, density) for d in self.config.domains]

    def merged(self, combo: str) -> Path:
        kind, method = combo.split("+")
        inputs = self.merge_inputs(kind)
        scale = self.config.merge.scale
        # TIES trims only unpruned (dense) deltas; pruned inputs are already at the merge density.
        density = self.config.merge.density if (kind == "dense" and method == "ties") else None
        expected = {"kind": "model", "method": method, "scale": scale, "density": density,
                    "deltas.*.content_hash": [self.hashes[p] for p in inputs]}
        return self._ensure(
            self.work / "merged" / combo, expected,
            lambda out: merge_deltas(self.base, inputs, out, method=method, scale=scale, density=density,
                                     overwrite=True, progress=False))

    # -- scores -----------------------------------------------------------------------------------------------------

    def run(self) -> tuple[list[dict], list[dict]]:
        """Build everything, then score it; returns (fine-tune rows, merge rows) in long format."""
        domains, prune = self.config.domains, self.config.prune
        self.log(f"[{self.name}] artifacts")
        pruned = {(d, m, x): self.pruned(d, m, x) for d in domains for m in prune.methods for x in prune.densities}
        amplified = {(d, "dppa"): self.amplified(d) for d in domains}
        compare = self.config.dppa.search.compare
        amplified.update({(d, f"dppa:{s}"): self.amplified(d, s) for d in domains for s in compare})
        merged = {c: self.merged(c) for c in self.config.merge.combos}
        self.log(f"[{self.name}] test scores (limit {self.config.evaluate.limit})")
        scorer = Scorer(VariantModel(self.base, self.device), EvalCache(self.cache_path), self.base_hash,
                        self.config.evaluate, self.log)
        self.scorer = scorer
        all_tasks = [task_of(d) for d in domains]
        base_scores = scorer.score(None, self.base_hash, all_tasks, is_delta=False)
        dense = {d: scorer.score(self.zoo / d, self.hashes[self.zoo / d], [task_of(d)], is_delta=False)[task_of(d)]
                 for d in domains}
        rows = []
        for d in domains:
            own = [task_of(d)]
            rows.append(self._row(d, "base", None, base_scores[task_of(d)], dense[d]))
            rows.append(self._row(d, "dense", 1.0, dense[d], dense[d]))
            for m in prune.methods:
                for x in prune.densities:
                    folder = pruned[(d, m, x)]
                    score = scorer.score(folder, self.hashes[folder], own, is_delta=True)[task_of(d)]
                    rows.append(self._row(d, m, x, score, dense[d]))
            for method in self.dppa_methods():
                folder = amplified[(d, method)]
                score = scorer.score(folder, self.hashes[folder], own, is_delta=True)[task_of(d)]
                rows.append(self._row(d, method, max(self.config.dppa.densities), score, dense[d],
                                      factors=self.searches[f"{method}/{d}"]["best_factors"]))
        merge_rows = [self._merge_row(d, "base", base_scores[task_of(d)], dense[d]) for d in domains]
        for combo, folder in merged.items():
            scores = scorer.score(folder, self.hashes[folder], all_tasks, is_delta=False)
            merge_rows += [self._merge_row(d, combo, scores[task_of(d)], dense[d]) for d in domains]
        return rows, merge_rows

    def _row(self, domain, method, density, score, dense, factors=None) -> dict:
        return {"regime": self.name, "finetune": domain, "method": method, "density": density,
                "factors": "" if factors is None else ",".join(f"{f:g}" for f in factors),
                "accuracy": score, "dense_accuracy": dense, "normalised": score / dense if dense > 0 else None}

    def _merge_row(self, domain, combo, score, dense) -> dict:
        return {"regime": self.name, "merge": combo, "domain": domain, "accuracy": score, "dense_accuracy": dense,
                "normalised": score / dense if dense > 0 else None}


# ---------------------------------------------------------------------------------------------------------------------
# Tables.


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def method_label(method: str) -> str:
    """"dp" -> "DP"; "dppa:pattern" -> "DPPA (pattern)"."""
    name, _, strategy = method.partition(":")
    return METHOD_LABEL[name] + (f" ({strategy})" if strategy else "")


def finetune_table(rows: list[dict], config: ExperimentConfig) -> str:
    """Normalised test score (accuracy / the dense fine-tune's) of each pruning of each fine-tune, and the mean."""
    dppa = ["dppa"] + [f"dppa:{s}" for s in config.dppa.search.compare]
    columns = [(m, x) for m in config.prune.methods for x in config.prune.densities]
    columns += [(m, max(config.dppa.densities)) for m in dppa]
    header = ["fine-tune", "dense accuracy", "base"] + [f"{method_label(m)} {x:g}" for m, x in columns] + \
             [f"{method_label(m)} factors" for m in dppa]
    cell = {(r["finetune"], r["method"], r["density"]): r for r in rows}
    body, per_column = [], {c: [] for c in [("base", None)] + columns}
    for d in config.domains:
        line = [d, _fmt(cell[(d, "dense", 1.0)]["accuracy"])]
        for c in per_column:
            value = cell[(d, *c)]["normalised"]
            per_column[c].append(value)
            line.append(_fmt(value))
        body.append(line + [cell[(d, m, max(config.dppa.densities))]["factors"] for m in dppa])
    body.append(["**mean**", ""] + [f"**{_fmt(_mean(v))}**" for v in per_column.values()] + [""] * len(dppa))
    return markdown_table(header, body)


def merge_label(combo: str, density: float) -> str:
    kind, method = combo.split("+")
    if kind == "dense":
        return f"{MERGE_LABEL[method]} (dense deltas{f', trim {density:g}' if method == 'ties' else ''})"
    return f"{METHOD_LABEL[kind]} + {MERGE_LABEL[method]}"


def merge_table(rows: list[dict], config: ExperimentConfig, field: str) -> str:
    """Per-domain test score (``field``: normalised or accuracy) of each merge of all fine-tunes, and the mean."""
    header = ["merge of all fine-tunes"] + config.domains + ["mean"]
    cell = {(r["merge"], r["domain"]): r[field] for r in rows}
    body = []
    for combo in ["base"] + list(config.merge.combos):
        values = [cell[(combo, d)] for d in config.domains]
        label = "base (no fine-tune)" if combo == "base" else merge_label(combo, config.merge.density)
        body.append([label] + [_fmt(v) for v in values] + [f"**{_fmt(_mean(values))}**"])
    return markdown_table(header, body)


def write_results(config: ExperimentConfig, results: dict[str, tuple[list[dict], list[dict]]], summary: dict) -> Path:
    """Markdown and CSV tables per regime, all tables in results.md, and summary.json; returns results.md."""
    out = config.results
    sections = [f"# Experiment results\n\n{_settings_line(config, summary)}\n"]
    for name, (rows, merge_rows) in results.items():
        ft_md = finetune_table(rows, config)
        merged_norm = merge_table(merge_rows, config, "normalised")
        merged_acc = merge_table(merge_rows, config, "accuracy")
        write_text_atomic(out / f"{name}_finetunes.md", ft_md)
        write_text_atomic(out / f"{name}_finetunes.csv", rows_to_csv(rows))
        write_text_atomic(out / f"{name}_merges.md", merged_norm + "\n" + merged_acc)
        write_text_atomic(out / f"{name}_merges.csv", rows_to_csv(merge_rows))
        sections.append(f"## {name} regime: each fine-tune pruned (normalised test score)\n\n{ft_md}\n"
                        f"## {name} regime: merging all fine-tunes (normalised test score)\n\n{merged_norm}\n"
                        f"### {name} regime: merging, raw test accuracy\n\n{merged_acc}\n")
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    write_text_atomic(out / "results.md", "\n".join(sections))
    return out / "results.md"


def _settings_line(config: ExperimentConfig, summary: dict) -> str:
    search = config.dppa.search.strategies
    compared = "".join(f"; DPPA ({c}): factors searched with `{c}` at the same number of candidates"
                       for c in search.compare)
    return (f"Test split, {config.evaluate.limit or 'all'} examples per task; exact match; normalised = accuracy / "
            f"the dense fine-tune's accuracy on its own task. DPPA bands {config.dppa.densities}, factors searched "
            f"with `{search.strategy}` on the validation split ({search.limit or 'all'} examples per candidate)"
            f"{compared}. Merge scale {config.merge.scale}; DARE/DP merge inputs at density "
            f"{config.merge.density:g}. Wall time {summary['wall_s']:.0f} s.")


# ---------------------------------------------------------------------------------------------------------------------
# Entry point.


def run_experiment(config: ExperimentConfig, *, device: str = "cpu", log: Callable[[str], None] = print) -> Path:
    """Run every regime of ``config``; returns the path of results.md."""
    from dppa.compute import resolve_device

    if config.evaluate.threads:
        torch.set_num_threads(config.evaluate.threads)
    started = time.perf_counter()
    dev = resolve_device(device)
    cache_path = config.work / "evalcache.jsonl"
    results, summary = {}, {"config": config.model_dump(mode="json"), "regimes": {}}
    for name in config.regimes:
        regime_started = time.perf_counter()
        run = RegimeRun(config, name, cache_path, dev, log)
        results[name] = run.run()
        summary["regimes"][name] = {"wall_s": round(time.perf_counter() - regime_started, 1),
                                    "test_evaluations": run.scorer.real_evaluations,
                                    "test_evaluate_s": round(run.scorer.evaluate_s, 1),
                                    "searches": run.searches}
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    path = write_results(config, results, summary)
    log(f"done in {summary['wall_s']:.0f} s: {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dppa.experiment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("params", help="experiment params YAML, e.g. experiments/paper.yaml")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="default cpu")
    args = parser.parse_args(argv)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # one warning line per evaluation otherwise
    try:
        path = run_experiment(load_config(args.params), device=args.device,
                              log=lambda m: print(m, flush=True))
    except DppaError as exc:
        print(f"experiment: error: {exc}", file=sys.stderr)
        return 2
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
