"""params.yaml's validation errors as one line each: `params.yaml: prune.density: must be in (0, 1], got 1.5`, and
for an unknown key the keys its section accepts."""

from __future__ import annotations

from pydantic import BaseModel, ValidationError


def _key_path(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if not str(part).startswith("function-"))


def _model_in(annotation) -> type[BaseModel] | None:
    candidates = [annotation, *getattr(annotation, "__args__", ())]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def _allowed_keys(schema: type[BaseModel], loc: tuple) -> list[str]:
    """The keys the section holding the unknown key at `loc` accepts, for the error message."""
    model, parts = schema, list(loc[:-1])
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


def describe_errors(exc: ValidationError, source: str, schema: type[BaseModel]) -> str:
    """One line per problem, naming the file and the key path."""
    lines = []
    for error in exc.errors():
        where = _key_path(error["loc"])  # empty for checks across sections, whose messages start with the key
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(schema, error["loc"])
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
