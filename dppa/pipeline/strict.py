"""The base of every params.yaml section: unknown keys are errors (a typo must not fall back to a default), and a
parsed section is frozen; the checks several sections share."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RegistryOptions(Strict):
    """A section whose keys beyond its own fields are the options of a registry's entries (a pruning method's, a
    search strategy's): kept as they are given, then checked and typed by dppa/pipeline/registered.py."""

    model_config = ConfigDict(extra="allow", frozen=True)


def check_density(value: float | None) -> float | None:
    if value is not None and not 0 < value <= 1:
        raise ValueError(f"must be in (0, 1], got {value}")
    return value


def check_positive(value: float | None) -> float | None:
    if value is not None and value <= 0:
        raise ValueError(f"must be > 0, got {value}")
    return value
