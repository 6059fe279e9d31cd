"""The checks of params.yaml that need the registries: the pruning and merge methods and the search strategy are
registered names, and every other key of `prune`, of a fine-tune's `prune` and of `amplify.search` is an option of a
registered entry, typed as its options dataclass declares and checked by the chosen entry's own dataclass.

They run after the schema (dppa/pipeline/config.py) has parsed the file, so that the schema stays a set of plain
classes, and a plugin registered after import is seen. The search strategy left unset becomes the registry's
default here, the one default of the CLI and of params.yaml.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError

from dppa.errors import DppaError
from dppa.registry import Registry

if TYPE_CHECKING:
    from dppa.pipeline.config import Params
    from dppa.pipeline.strict import RegistryOptions


class Problems(list):
    """One line per problem, `KEY.PATH: message`."""

    def add(self, path: str, message: str) -> None:
        self.append(f"{path}: {message}")


def choices(names: tuple[str, ...]) -> str:
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def check_name(registry: Registry, name: str | None, path: str, problems: Problems) -> None:
    if name is not None and name not in registry:
        problems.add(path, f"Input should be {choices(registry.names())}, got {name!r}")


def typed_options(
    registry: Registry, section: RegistryOptions, path: str, problems: Problems, optional: bool = False
) -> dict[str, Any]:
    """The section's option keys with values of the types their dataclasses declare; unknown keys are problems."""
    fields = registry.option_fields()
    typed = {}
    for key, value in (section.model_extra or {}).items():
        option = fields.get(key)
        if option is None:
            allowed = sorted({*type(section).model_fields, *fields})
            problems.add(f"{path}.{key}", f"unknown key; allowed keys here: {', '.join(allowed)}")
            continue
        try:
            typed[key] = TypeAdapter(option.type | None if optional else option.type).validate_python(value)
        except ValidationError as exc:
            problems.add(f"{path}.{key}", f"{exc.errors()[0]['msg']}, got {value!r}")
    return typed


def checked_by_entry(
    registry: Registry, name: str, values: dict, path: str, problems: Problems, *, foreign_ok: bool = True
) -> None:
    """The chosen entry's options dataclass checks the values (the one place their rules are written); with
    `foreign_ok` the options of other entries are ignored, else refused."""
    try:
        registry.make_options(name, values) if foreign_ok else registry.options_for(name, values)
    except (ValueError, TypeError, DppaError) as exc:
        problems.add(path, f"{name} options: {exc}")


def check_registered(params: Params, source: str = "params.yaml") -> Params:
    """`params` with its registry options typed and the default strategy filled in; raises DppaError naming every
    problem, one line each."""
    from dppa.merging.registry import MERGERS
    from dppa.search.registry import DEFAULT_STRATEGY, STRATEGIES
    from dppa.sparsify.registry import PRUNERS

    problems = Problems()
    check_name(PRUNERS, params.prune.method, "prune.method", problems)
    check_name(MERGERS, params.merge.method, "merge.method", problems)
    prune = params.prune.model_copy(update=typed_options(PRUNERS, params.prune, "prune", problems))
    finetunes = {}
    for name, entry in params.models.finetunes.items():
        path = f"models.finetunes.{name}.prune"
        check_name(PRUNERS, entry.prune.method, f"{path}.method", problems)
        override = entry.prune.model_copy(update=typed_options(PRUNERS, entry.prune, path, problems, optional=True))
        finetunes[name] = entry.model_copy(update={"prune": override})
    update = {"prune": prune, "models": params.models.model_copy(update={"finetunes": finetunes})}
    search = params.amplify.search
    if search is not None:
        check_name(STRATEGIES, search.strategy, "amplify.search.strategy", problems)
        typed = typed_options(STRATEGIES, search, "amplify.search", problems, optional=True)
        search = search.model_copy(update={**typed, "strategy": search.strategy or DEFAULT_STRATEGY})
        update["amplify"] = params.amplify.model_copy(update={"search": search})
    if not problems:  # the values, once every name and type is right
        checked = params.model_copy(update=update)
        checked_by_entry(PRUNERS, checked.prune.method, checked.prune.model_dump(), "prune", problems)
        for name, entry in checked.models.finetunes.items():
            if entry.prune.model_dump(exclude_none=True):  # its own overrides: the settings it prunes with
                settings, path = checked.prune_for(name), f"models.finetunes.{name}.prune"
                checked_by_entry(PRUNERS, settings.method, settings.model_dump(), path, problems)
        if search is not None:
            values = {k: v for k, v in search.model_dump().items() if k not in ("strategy", "split", "limit")}
            checked_by_entry(STRATEGIES, search.strategy, values, "amplify.search", problems, foreign_ok=False)
    if problems:
        raise DppaError("\n".join(f"{source}: {line}" for line in problems))
    return checked
