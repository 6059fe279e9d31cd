"""`params.yaml`, the pipeline's one configuration: a typed model that is checked before any work starts.

One class per section. The names and options that come from the registries (pruning and merge methods, search
strategies: a plugin adds its own) are checked by dppa/pipeline/registered.py; the model sources are resolved by
dppa/pipeline/sources.py; the one-line error messages come from dppa/pipeline/config_errors.py.

Every problem is reported as one line naming the key path, e.g.
``params.yaml: prune.density: must be in (0, 1], got 1.5``.
Unknown keys are errors (a typo must not silently fall back to a default).

The same file is read by DVC (`dvc.yaml` interpolates it and tracks the keys each stage uses) and by the stage
commands (through `load_params`), so there is nothing to keep in sync by hand.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from dppa.errors import DppaError
from dppa.pipeline.config_errors import describe_errors
from dppa.pipeline.merge_config import Merge
from dppa.pipeline.runtime_config import Runtime
from dppa.pipeline.sources import ZOO_PREFIX, ModelEntry
from dppa.pipeline.strict import RegistryOptions, Strict, check_density
from dppa.sparsify.scope import DEFAULT_SCOPE

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
BASE_NAME = "base"


class AmplifyOverride(Strict):
    factors: list[float] | None = None  # fixed factors for this fine-tune (no search for it)


class PruneOverride(RegistryOptions):
    """Per-fine-tune pruning keys (method, density, any registered method's options); unset ones come from the
    `prune` section."""

    method: str | None = None
    density: float | None = None

    _density = field_validator("density")(check_density)


class FinetuneEntry(ModelEntry):
    # lm-eval tasks of this fine-tune's domain; optional when nothing scores it (fixed factors, a fixed merge scale,
    # and no evaluation of it)
    tasks: list[str] = []
    prune: PruneOverride = PruneOverride()
    amplify: AmplifyOverride = AmplifyOverride()


class Models(Strict):
    base: ModelEntry
    finetunes: dict[str, FinetuneEntry] = Field(min_length=1)  # name -> entry; each gets its own stages

    @field_validator("finetunes")
    @classmethod
    def _names(cls, value: dict) -> dict:
        for name in value:
            if not NAME.match(name) or name == BASE_NAME:
                raise ValueError(
                    f"fine-tune name {name!r}: use lower-case letters, digits, - or _ (not 'base'); "
                    "it names folders and DVC stages"
                )
        return value


class Zoo(Strict):
    size: Literal["tiny", "default", "smollm2-135m", "none"] = "default"
    regime: Literal["heavy", "light"] = "heavy"
    seed: int = 0


class Extract(Strict):
    # source: the fine-tune's own dtype (bf16 deltas of bf16 models); the arithmetic is float32 either way
    dtype: Literal["source", "float32", "bfloat16", "float16"] = "source"


class Prune(RegistryOptions):
    """The `prune` section: the method, the density and the scope; any other key is an option of a registered pruning
    method (dppa/pipeline/registered.py checks it). Options of methods other than the chosen one are accepted (and
    ignored), so a grid can switch methods without deleting keys."""

    method: str
    density: float
    scope: str = DEFAULT_SCOPE

    _density = field_validator("density")(check_density)

    @field_validator("scope")
    @classmethod
    def _scope(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from None
        return value

    def options(self):
        """The chosen method's options dataclass."""
        from dppa.sparsify.registry import PRUNERS

        return PRUNERS.make_options(self.method, self.model_dump())


class Search(RegistryOptions):
    """`amplify.search`: the strategy (unset: the registry's default), the budget and the split; any other key is an
    option of a registered strategy (unset: the strategy's default)."""

    strategy: str | None = None
    budget: int | None = Field(default=None, ge=1)
    split: Literal["validation"] = "validation"  # the test split is kept for the final numbers
    limit: int | None = Field(default=None, ge=1)


class Amplify(Strict):
    # Band edges as fractions of the fine-tune's prune density: [0.5, 1.0] at density 0.2 gives the paper's
    # bands 0.1 / 0.2, and a fine-tune with its own density gets bands scaled to it.
    bands: list[float] = Field(default=[0.5, 1.0], min_length=1)
    factors: list[float] | None = None
    search: Search | None = None

    @field_validator("bands")
    @classmethod
    def _bands(cls, value: list[float]) -> list[float]:
        if any(not 0 < b <= 1 for b in value) or value != sorted(set(value)):
            raise ValueError(f"must be increasing fractions in (0, 1], got {value}")
        return value

    @model_validator(mode="after")
    def _factors_or_search(self):
        if (self.factors is None) == (self.search is None):
            raise ValueError("give exactly one of `factors` (fixed) or `search` (tuned on the validation split)")
        if self.factors is not None and len(self.factors) != len(self.bands):
            raise ValueError(f"factors: {len(self.factors)} factors for {len(self.bands)} bands; give one per band")
        return self


class Evaluate(Strict):
    tasks: list[str] | None = None  # None: every fine-tune's tasks; []: no evaluation (a merge-only pipeline)
    split: Literal["validation", "test"] = "test"
    limit: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=32, ge=1)


class PublishGate(Strict):
    min_score: float | None = None  # least normalised score of the merged model (summary.json's normalised)
    no_worse: bool = True  # refuse a model scoring below the one last published to the revision
    fail_run: bool = False  # a refused publish fails the run (else one line in the report, and the run succeeds)


class Publish(Strict):
    repo: str | None = None  # ORG/NAME on the hub; null: nothing is published (the default)
    revision: str = "main"  # the branch to commit to (created from main if missing)
    private: bool = False  # create the repository private
    gate: PublishGate = PublishGate()


class Params(Strict):
    models: Models
    zoo: Zoo = Zoo()
    extract: Extract = Extract()
    prune: Prune
    amplify: Amplify
    merge: Merge
    evaluate: Evaluate = Evaluate()
    publish: Publish = Publish()
    runtime: Runtime = Runtime()

    @field_validator("evaluate", mode="before")
    @classmethod
    def _no_evaluation(cls, value):
        return {"tasks": []} if value is None else value  # `evaluate: null` evaluates nothing

    @model_validator(mode="after")
    def _consistent(self):
        names = set(self.models.finetunes)
        if isinstance(self.merge.weights, dict) and set(self.merge.weights) != names:
            raise ValueError(
                f"merge.weights: give one weight per fine-tune ({', '.join(sorted(names))}), "
                f"got {', '.join(sorted(self.merge.weights))}"
            )
        for name, entry in self.models.finetunes.items():
            factors = entry.amplify.factors
            if factors is not None and len(factors) != len(self.amplify.bands):
                raise ValueError(
                    f"models.finetunes.{name}.amplify.factors: {len(factors)} factors for "
                    f"{len(self.amplify.bands)} bands"
                )
        untasked = [n for n, e in self.models.finetunes.items() if not e.tasks]
        searched = [n for n in untasked if self.merge.inputs == "amplified" and self.fixed_factors(n) is None]
        if searched:
            raise ValueError(
                f"amplify.search: the factor search scores each fine-tune on its own tasks, but "
                f"{', '.join(searched)} has none (models.finetunes.{searched[0]}.tasks); give its tasks or fixed "
                "amplify.factors"
            )
        if untasked and self.merge.scale == "search":
            raise ValueError(
                f"merge.scale: search scores the merge on the fine-tunes' own tasks, but {', '.join(untasked)} "
                f"has none (models.finetunes.{untasked[0]}.tasks); give a number or its tasks"
            )
        uses_zoo = [n for n, e in self.all_models().items() if e.source.startswith(ZOO_PREFIX)]
        if uses_zoo and self.zoo.size == "none":
            raise ValueError(f"zoo.size: none, but {', '.join(uses_zoo)} use a zoo: source; set zoo.size")
        return self

    # -- derived values the stages use --------------------------------------------------------------------------

    def all_models(self) -> dict[str, ModelEntry]:
        return {BASE_NAME: self.models.base, **self.models.finetunes}

    def hub_revisions(self, root: Path) -> set[tuple[str, str]]:
        """(repository id, revision) of every model that comes from the hub."""
        return {
            (source.ref, e.revision) for e in self.all_models().values() if (source := e.resolve(root)).kind == "hub"
        }

    def follows_hub_branch(self, root: Path) -> bool:
        """Whether a model is a hub repository at a branch or tag (which may move upstream) rather than a commit."""
        from dppa.pipeline.hub import is_commit_sha

        return any(not is_commit_sha(revision) for _, revision in self.hub_revisions(root))

    def finetune(self, name: str) -> FinetuneEntry:
        if name not in self.models.finetunes:
            raise DppaError(
                f"--model {name}: not a fine-tune in params.yaml (models.finetunes has "
                f"{', '.join(self.models.finetunes)})"
            )
        return self.models.finetunes[name]

    def prune_for(self, name: str) -> Prune:
        """The global `prune` section with this fine-tune's overrides applied."""
        override = self.finetune(name).prune.model_dump(exclude_none=True)
        return self.prune.model_copy(update=override)

    def band_densities(self, name: str) -> list[float]:
        density = self.prune_for(name).density
        return [round(b * density, 10) for b in self.amplify.bands]

    def fixed_factors(self, name: str) -> list[float] | None:
        """This fine-tune's fixed factors, or None when they are to be searched."""
        return self.finetune(name).amplify.factors or self.amplify.factors

    def eval_tasks(self) -> list[str]:
        """The tasks of the evaluation stages; [] when nothing is to be evaluated."""
        if self.evaluate.tasks is not None:
            return list(self.evaluate.tasks)
        seen: dict[str, None] = {}
        for entry in self.models.finetunes.values():
            seen.update(dict.fromkeys(entry.tasks))
        return list(seen)

    def not_evaluated(self, name: str | None = None) -> str | None:
        """Why the evaluation stages evaluate nothing (for fine-tune `name`: why it is not scored alone), or None."""
        if self.evaluate.tasks == []:
            return "evaluate.tasks is empty"
        if name is not None and not self.finetune(name).tasks:
            return f"models.finetunes.{name}.tasks is empty"
        if not self.eval_tasks():
            return "no fine-tune names tasks and evaluate.tasks is unset"
        return None


def parse_params(data: dict, *, source: str = "params.yaml", root: str | Path = ".") -> Params:
    """The checked params: the schema's checks, then those of the registries (names and options)."""
    try:
        params = Params.model_validate(data, context={"root": Path(root)})
    except ValidationError as exc:
        raise DppaError(describe_errors(exc, source, Params)) from None
    # Imported here: the checks run in the command that reads params.yaml, and none of them changes what a stage
    # writes, so a stage's code deps (scripts/code_deps.py) need not name them.
    from dppa.pipeline.registered import check_registered

    return check_registered(params, source)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and check `path`; relative model paths are relative to its folder."""
    path = Path(path)
    if not path.is_file():
        raise DppaError(f"{path}: no such params file; run from the project folder or pass --params")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DppaError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise DppaError(f"{path}: expected a mapping of sections (models, prune, amplify, merge, ...)")
    return parse_params(data, source=path.name, root=path.resolve().parent)
