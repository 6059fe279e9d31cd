"""STAND-IN (pipeline branch): the merge-method registry's agreed interface, until the engine branch's lands."""

from __future__ import annotations

from dppa.registry import Registry

MERGERS: Registry = Registry("merge method", "--method")
MERGERS.register("task_arithmetic", help="base + scale * sum of weighted deltas")(None)
MERGERS.register("ties", help="trim, elect sign, disjoint mean")(None)
