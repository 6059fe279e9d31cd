"""Registries of extension points (pruning methods, merge methods, search strategies).

Each entry is a name, a callable and one frozen options dataclass that declares the entry's own options and their
defaults once. The CLI's choices and flags (`add_options`), the params.yaml checks (`option_fields`, in
dppa/pipeline/registered.py) and the engine's keyword arguments all come from that dataclass, so adding a method is
one file and one `@REGISTRY.register(...)`.

Option fields may carry ``metadata={"help": "...", "flag": "--name"}``: the help text and, when the flag differs
from the field name with dashes, the CLI flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from dppa.errors import DppaError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    impl: T
    options: type  # a frozen dataclass; instances hold the entry's option values
    help: str = ""


@dataclass(frozen=True)
class NoOptions:
    """For entries that take no options of their own."""


class Registry(Generic[T]):
    """Name -> Entry; `kind` names the extension point in error messages ("pruning method", ...)."""

    def __init__(self, kind: str, flag: str):
        self.kind = kind
        self.flag = flag  # the CLI flag that chooses an entry, for error messages
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, *, options: type = NoOptions, help: str = "") -> Callable[[T], T]:
        """Decorator: `@PRUNERS.register("dp", options=DPOptions, help="...")` on the implementation."""
        if not dataclasses.is_dataclass(options):
            raise TypeError(f"{self.kind} {name!r}: options must be a dataclass, got {options!r}")

        def add(impl: T) -> T:
            if name in self._entries and self._entries[name].impl is not impl:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, impl, options, help)
            return impl

        return add

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries.values())

    def get(self, name: str) -> Entry[T]:
        if name not in self._entries:
            raise DppaError(f"{self.flag} {name}: unknown {self.kind}; use one of {', '.join(self._entries)}")
        return self._entries[name]

    def make_options(self, name: str, values: dict[str, Any]) -> Any:
        """The entry's options dataclass from `values`, ignoring keys that belong to other entries."""
        options = self.get(name).options
        known = {f.name for f in dataclasses.fields(options)}
        return options(**{k: v for k, v in values.items() if k in known})

    def options_for(self, name: str, values: Any = None) -> Any:
        """The entry's options from None (defaults), an instance of its options class, or a dict of option values.

        None in a dict means "not given" (the default). A dict may not set an option the entry does not have: it
        would be silently ignored.
        """
        options = self.get(name).options
        if values is None:
            return options()
        if isinstance(values, options):
            return values
        if not isinstance(values, dict):
            raise TypeError(f"{self.kind} {name!r}: options must be {options.__name__} or a dict, got {values!r}")
        known = {f.name for f in dataclasses.fields(options)}
        for key, value in values.items():
            if key not in known and value is not None:
                self._refuse_foreign(name, key)
        return options(**{k: v for k, v in values.items() if k in known and v is not None})

    def options_from_args(self, name: str, args: argparse.Namespace) -> Any:
        """The entry's options from parsed CLI arguments; refuses a flag of another entry given on the command line."""
        return self.options_for(name, {key: getattr(args, key, None) for key in self.option_fields()})

    def _refuse_foreign(self, name: str, key: str) -> None:
        owners = [e.name for e in self if key in {f.name for f in dataclasses.fields(e.options)}]
        if owners:
            raise DppaError(
                f"{self.option_fields()[key].flag} is an option of {', '.join(owners)}, not of {self.kind} {name}"
            )
        own = ", ".join(f.name for f in dataclasses.fields(self.get(name).options)) or "none"
        raise DppaError(f"{key}: not an option of {self.kind} {name} (its options: {own})")

    def option_fields(self) -> dict[str, Option]:
        """Every option of every entry, by name (entries may share an option class, e.g. DP's options)."""
        fields: dict[str, Option] = {}
        for entry in self:
            fields.update((o.name, o) for o in options_of(entry.options) if o.name not in fields)
        return fields

    def describe(self, columns: int = 116) -> str:
        """One paragraph per entry (name, then its help wrapped beside it), for `--help` texts."""
        width = max((len(n) for n in self._entries), default=0)
        return "\n".join(
            textwrap.fill(
                e.help,
                columns,
                initial_indent=f"  {e.name:<{width}}  ",
                subsequent_indent=" " * (width + 4),
                break_on_hyphens=False,
            )
            for e in self
        )


@dataclass(frozen=True)
class Option:
    """One option field with its resolved type and default (`...` when required)."""

    name: str
    type: Any
    default: Any
    help: str
    flag: str


def options_of(options: type) -> list[Option]:
    hints = typing.get_type_hints(options)  # resolves `from __future__ import annotations` strings
    out = []
    for f in dataclasses.fields(options):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...
        out.append(
            Option(
                f.name,
                hints[f.name],
                default,
                f.metadata.get("help", ""),
                f.metadata.get("flag", "--" + f.name.replace("_", "-")),
            )
        )
    return out


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, options: list[Option]) -> None:
    """One CLI flag per option, typed and defaulted from the dataclass."""
    for o in options:
        help_text = o.help
        if o.default not in (..., None):
            help_text = f"{help_text} (default {o.default})" if help_text else f"default {o.default}"
        if o.type is bool:  # --name / --no-name
            parser.add_argument(
                o.flag, dest=o.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        parser.add_argument(
            o.flag, dest=o.name, type=_scalar_type(o.type), default=None, help=help_text, required=o.default is ...
        )


def _scalar_type(annotation) -> Callable[[str], Any]:
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    for candidate in (int, float, str):
        if candidate in args:
            return candidate
    return str
