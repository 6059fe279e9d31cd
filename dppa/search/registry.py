"""STAND-IN (pipeline branch): the search-strategy registry's agreed interface, until the search branch's lands."""

from __future__ import annotations

from dppa.registry import Registry

STRATEGIES: Registry = Registry("search strategy", "--strategy")
STRATEGIES.register("coordinate", help="the reference's greedy coordinate ascent")(None)
STRATEGIES.register("pattern", help="pattern search")(None)
