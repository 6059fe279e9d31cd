"""`params.yaml`, the pipeline's one configuration: a typed model that is checked before any work starts.

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
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from dppa.errors import DppaError
from dppa.registry import pydantic_fields
from dppa.sparsify.scope import DEFAULT_SCOPE

ZOO_PREFIX = "zoo:"
HUB_PREFIX = "hub:"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
BASE_NAME = "base"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_density(value: float | None) -> float | None:
    if value is not None and not 0 < value <= 1:
        raise ValueError(f"must be in (0, 1], got {value}")
    return value


def _check_positive(value: float | None) -> float | None:
    if value is not None and value <= 0:
        raise ValueError(f"must be > 0, got {value}")
    return value


class Source:
    """Where a model comes from: the demo zoo, a hub repository at a revision, or a local folder."""

    def __init__(self, kind: Literal["zoo", "hub", "local"], ref: str):
        self.kind, self.ref = kind, ref

    def __repr__(self) -> str:
        return f"Source({self.kind}, {self.ref})"


def parse_source(text: str, revision: str | None, root: Path) -> Source:
    """`zoo:<domain>` | `hub:<org>/<name>` or `<org>/<name>` (needs a revision) | a local folder (must exist)."""
    if text.startswith(ZOO_PREFIX):
        return Source("zoo", text[len(ZOO_PREFIX) :])
    local = Path(text).expanduser()
    local = local if local.is_absolute() else root / local
    explicit_hub = text.startswith(HUB_PREFIX)
    repo_id = text[len(HUB_PREFIX) :] if explicit_hub else text
    if explicit_hub or (HUB_ID.match(text) and not local.exists()):
        if not HUB_ID.match(repo_id):
            raise ValueError(f"{text!r} is not a hub id of the form org/name")
        if not revision:
            raise ValueError(
                f"hub model {repo_id!r} needs a `revision`: a commit sha (pinned), or a branch or tag "
                "(followed: `dppa run` refetches it when it moves)"
            )
        return Source("hub", repo_id)
    if not local.is_dir():
        raise ValueError(
            f"no model folder at {local}; give an existing local folder, zoo:<domain> "
            "or a hub id org/name with a revision"
        )
    return Source("local", str(local.resolve()))


class AmplifyOverride(Strict):
    factors: list[float] | None = None  # fixed factors for this fine-tune (no search for it)


class ModelEntry(Strict):
    revision: str | None = None  # declared first: checking `source` needs it
    source: str

    @field_validator("source")
    @classmethod
    def _source_resolves(cls, value: str, info: ValidationInfo) -> str:
        parse_source(value, info.data.get("revision"), _root(info))
        return value

    def resolve(self, root: Path) -> Source:
        return parse_source(self.source, self.revision, root)


class FinetuneEntryBase(ModelEntry):  # `prune` (its overrides) is added by `_models()`
    # lm-eval tasks of this fine-tune's domain; optional when nothing scores it (fixed factors, a fixed merge scale,
    # and no evaluation of it)
    tasks: list[str] = []
    amplify: AmplifyOverride = AmplifyOverride()


class ModelsBase(Strict):  # `finetunes` is added by `_models()`
    base: ModelEntry

    @field_validator("finetunes", check_fields=False)
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


class PruneBase(Strict):
    """The `prune` section's fixed keys; `method` and every registered method's options are added by `_models()`.

    Options of methods other than the chosen one are accepted (and ignored), so a grid can switch methods
    without deleting keys.
    """

    density: float
    scope: str = DEFAULT_SCOPE

    _density = field_validator("density")(_check_density)

    @field_validator("scope")
    @classmethod
    def _scope(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from None
        return value

    @model_validator(mode="after")
    def _options_valid(self):
        # The method's own options dataclass checks its values (the one place they are written).
        from dppa.sparsify.registry import PRUNERS

        try:
            PRUNERS.make_options(self.method, self.model_dump())
        except (ValueError, TypeError, DppaError) as exc:
            raise ValueError(f"{self.method} options: {exc}") from None
        return self

    def options(self):
        """The chosen method's options dataclass."""
        from dppa.sparsify.registry import PRUNERS

        return PRUNERS.make_options(self.method, self.model_dump())


class PruneOverrideBase(Strict):
    """Per-fine-tune pruning keys (method, density, method options); unset ones come from the `prune` section."""

    density: float | None = None

    _density = field_validator("density")(_check_density)


class SearchBase(Strict):  # `strategy` comes from the strategy registry (`_models()`)
    budget: int | None = Field(default=None, ge=1)
    split: Literal["validation"] = "validation"  # the test split is kept for the final numbers
    limit: int | None = Field(default=None, ge=1)


class AmplifyBase(Strict):
    # Band edges as fractions of the fine-tune's prune density: [0.5, 1.0] at density 0.2 gives the paper's
    # bands 0.1 / 0.2, and a fine-tune with its own density gets bands scaled to it.
    bands: list[float] = Field(default=[0.5, 1.0], min_length=1)
    factors: list[float] | None = None

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


class MergeSearch(Strict):
    """`merge.scale: search`: each scale of the grid is scored on the validation split (through the evaluation
    cache), by the geometric mean over fine-tunes of their tasks' score over the dense fine-tune's."""

    grid: list[float] = Field(default=[0.3, 0.5, 0.7, 1.0], min_length=1)
    # with `merge.weights: search`: the weights tried for each fine-tune in turn (coordinate ascent)
    weight_grid: list[float] = Field(default=[0.5, 1.0, 1.5, 2.0], min_length=1)
    split: Literal["validation"] = "validation"  # the test split is kept for the final numbers
    limit: int | None = Field(default=None, ge=1)

    @field_validator("grid", "weight_grid")
    @classmethod
    def _grid(cls, value: list[float]) -> list[float]:
        if any(v <= 0 for v in value) or len(set(value)) != len(value):
            raise ValueError(f"must be distinct values > 0, got {value}")
        return value


class MergeBase(Strict):  # `method` comes from the merge-method registry (`_models()`)
    scale: float | Literal["search"]
    search: MergeSearch | None = None
    weights: dict[str, float] | Literal["search"] | None = None
    density: float | None = None
    inputs: Literal["amplified", "pruned", "deltas"] = "amplified"  # the folder under data/ (dvc.yaml)
    # deltas extracted from another base are refused unless the transfer is deliberate (merge --allow-other-base)
    allow_other_base: bool = False

    _density = field_validator("density")(_check_density)

    @field_validator("scale")
    @classmethod
    def _scale(cls, value):
        return value if value == "search" else _check_positive(value)

    @model_validator(mode="after")
    def _search_iff_searched(self):
        if (self.scale == "search") != (self.search is not None):
            raise ValueError(
                "`scale: search` needs a `search` section (grid, split, limit), and a `search` "
                "section needs `scale: search`"
            )
        if self.weights == "search" and self.scale != "search":
            raise ValueError("`weights: search` searches weights and scale together: set `scale: search` too")
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


class Runtime(Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # "threads" | "local-cluster:N" (a Dask LocalCluster of N worker processes) | "local-gpu-cluster[:N]" (one
    # Dask worker per visible GPU, pinned to it, plus N CPU-only workers, default 0) | a Dask scheduler address
    task_runner: str = "threads"
    concurrency: int = Field(default=2, ge=1)
    gpu_concurrency: int = Field(default=1, ge=1)
    # On Dask: the model-heavy stages run only on workers started with `--resources GPU=1`. Unset: when device is
    # cuda or the runner is local-gpu-cluster. The threads runner ignores it.
    gpu_resource: bool | None = None
    # When another run holds the project: fail at once naming it, skip this run, or wait for it. Unset: fail for
    # a run started by hand, skip for a scheduled one (the next schedule picks the work up).
    on_overlap: Literal["wait", "skip", "fail"] | None = None
    # Where a failed run is sent (off when unset): a Prefect notification block saved as "BLOCK-TYPE/NAME" (its
    # secrets stay in Prefect), or a webhook URL that receives a JSON POST.
    notify: str | None = None

    @field_validator("notify")
    @classmethod
    def _notify(cls, value: str | None) -> str | None:
        if value is None or re.match(r"^https?://[^\s]+$", value) or re.match(r"^[a-z0-9-]+/[\w.-]+$", value):
            return value
        raise ValueError(
            "use a Prefect notification block as BLOCK-TYPE/NAME (e.g. slack-webhook/nightly) or an http(s) webhook URL"
        )  # the value is not repeated: a webhook URL may hold a secret

    def gpu_cluster_cpu_workers(self) -> int | None:
        """The CPU-only workers of `local-gpu-cluster[:N]`; None for any other task runner."""
        found = re.match(r"^local-gpu-cluster(?::(\d+))?$", self.task_runner)
        return None if found is None else int(found.group(1) or 0)

    def needs_gpu_resource(self) -> bool:
        if self.gpu_resource is not None:
            return self.gpu_resource
        return self.device == "cuda" or self.gpu_cluster_cpu_workers() is not None

    @field_validator("task_runner")
    @classmethod
    def _runner(cls, value: str) -> str:
        if value == "threads" or re.match(r"^local-cluster:[1-9]\d*$", value):
            return value
        if re.match(r"^local-gpu-cluster(:(0|[1-9]\d*))?$", value):
            return value
        if re.match(r"^(tcp|tls|inproc|ucx)://", value):
            return value
        raise ValueError(
            f"{value!r}: use threads, local-cluster:N, local-gpu-cluster[:N] or a Dask scheduler address "
            "tcp://host:port"
        )

    @model_validator(mode="after")
    def _gpu_cluster(self):
        cpu_workers = self.gpu_cluster_cpu_workers()
        if cpu_workers is None:
            return self
        if self.device == "cpu":
            raise ValueError(
                f"task_runner {self.task_runner} puts the model-heavy stages on GPUs but device is cpu: "
                "set device: auto or cuda, or use task_runner: local-cluster:N"
            )
        if self.gpu_resource is False:
            raise ValueError(
                f"task_runner {self.task_runner} with gpu_resource: false would let model-heavy stages run on "
                "CPU-only workers: leave gpu_resource unset"
            )
        if cpu_workers and self.device == "cuda":
            # extract and prune follow runtime.device, and a CPU-only worker sees no GPU
            raise ValueError(
                f"task_runner {self.task_runner}: its {cpu_workers} CPU-only workers see no GPU, so extract and "
                "prune there cannot use device cuda: set device: auto (GPU workers use their GPU, CPU-only "
                "workers the CPU) or use local-gpu-cluster without :N"
            )
        return self


class ParamsBase(Strict):  # models, prune, amplify and merge are added by `_models()`
    zoo: Zoo = Zoo()
    extract: Extract = Extract()
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

    def finetune(self, name: str) -> FinetuneEntryBase:
        if name not in self.models.finetunes:
            raise DppaError(
                f"--model {name}: not a fine-tune in params.yaml (models.finetunes has "
                f"{', '.join(self.models.finetunes)})"
            )
        return self.models.finetunes[name]

    def prune_for(self, name: str) -> PruneBase:
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


def _models() -> type[ParamsBase]:
    """The params schema, with the method names and options of the registries as they are now (a plugin
    registered after this module was imported is included)."""
    from dppa.merging.registry import MERGERS
    from dppa.search.registry import STRATEGIES
    from dppa.sparsify.registry import PRUNERS

    options = PRUNERS.option_fields()
    key = (PRUNERS.names(), tuple(options.values()), MERGERS.names(), STRATEGIES.names())
    if key not in _SCHEMAS:
        methods = Literal[PRUNERS.names()]
        fields = pydantic_fields(list(options.values()))
        prune = create_model("Prune", __base__=PruneBase, method=(methods, ...), **fields)
        override = create_model(
            "PruneOverride",
            __base__=PruneOverrideBase,
            method=(methods | None, None),
            **{name: (typ | None, None) for name, (typ, _default) in fields.items()},
        )
        finetune = create_model("FinetuneEntry", __base__=FinetuneEntryBase, prune=(override, override()))
        models = create_model("Models", __base__=ModelsBase, finetunes=(dict[str, finetune], Field(min_length=1)))
        search = create_model(
            "Search", __base__=SearchBase, strategy=(Literal[STRATEGIES.names()], STRATEGIES.names()[0])
        )
        amplify = create_model("Amplify", __base__=AmplifyBase, search=(search | None, None))
        merge = create_model("Merge", __base__=MergeBase, method=(Literal[MERGERS.names()], ...))
        _SCHEMAS[key] = create_model(
            "Params",
            __base__=ParamsBase,
            models=(models, ...),
            prune=(prune, ...),
            amplify=(amplify, ...),
            merge=(merge, ...),
        )
    return _SCHEMAS[key]


_SCHEMAS: dict[tuple, type[ParamsBase]] = {}


def _root(info: ValidationInfo) -> Path:
    return Path((info.context or {}).get("root", "."))


def _key_path(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if not str(part).startswith("function-"))


def _model_in(annotation) -> type[BaseModel] | None:
    candidates = [annotation, *getattr(annotation, "__args__", ())]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def _allowed_keys(loc: tuple) -> list[str]:
    """The keys the section holding the unknown key at `loc` accepts, for the error message."""
    model, parts = _models(), list(loc[:-1])
    while parts and model is not None:
        field = model.model_fields.get(str(parts.pop(0)))
        if field is None:
            return []
        args = getattr(field.annotation, "__args__", ())
        if getattr(field.annotation, "__origin__", None) is dict and parts:
            parts.pop(0)  # a name (fine-tune) key: step into the value type
            model = _model_in(args[1])
        else:
            model = _model_in(field.annotation)
    return sorted(model.model_fields) if model else []


def describe_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for error in exc.errors():
        where = _key_path(error["loc"])  # empty for checks across sections, whose messages start with the key
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(error["loc"])
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            message = f"unknown key{hint}"
        elif error["type"] == "missing":
            message = "required key is missing"
        else:
            message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            if error["type"] not in ("value_error", "assertion_error") and "input" in error:
                message += f", got {error['input']!r}"
        lines.append(f"{source}: {where}: {message}" if where else f"{source}: {message}")
    return "\n".join(lines)


def parse_params(data: dict, *, source: str = "params.yaml", root: str | Path = ".") -> ParamsBase:
    try:
        return _models().model_validate(data, context={"root": Path(root)})
    except ValidationError as exc:
        raise DppaError(describe_errors(exc, source)) from None


def load_params(path: str | Path = "params.yaml") -> ParamsBase:
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
