"""The search strategies by name: ``STRATEGIES.get(name).impl(objective, n_bands, options) -> SearchResult``.

Each strategy is one module with one frozen options dataclass (its budget, grid step and own knobs) and one
``@STRATEGIES.register``; importing this module registers the built-in ones. ``reference`` is kept as another name
for ``coordinate``, the reference implementation's search, because users' commands and configs say it.
"""

from __future__ import annotations

from dppa.registry import Registry

STRATEGIES: Registry = Registry("search strategy", "--strategy")
ALIASES = {"reference": "coordinate"}
DEFAULT_STRATEGY = "coordinate"  # the reference's search: the default of the CLI and of params.yaml alike


def canonical(name: str) -> str:
    """The registered name for ``name`` (an alias or a name)."""
    return ALIASES.get(name, name)


from dppa.search import coordinate, pattern  # noqa: E402,F401  (registers the built-in strategies)
