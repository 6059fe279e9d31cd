"""Merging deltas into the base: task arithmetic and TIES, streamed chunk by chunk."""

# The built-in merge methods register themselves in `dppa.merging.registry.MERGERS` on import, in this order.
from dppa.merging import task_arithmetic, ties  # noqa: F401
