"""Pruning methods (magnitude, DARE, Dynamic Pruning) and Dynamic Partition Amplification of deltas."""

# The built-in pruning methods register themselves in `dppa.sparsify.registry.PRUNERS` on import, in this order.
from dppa.sparsify import magnitude, dare, dp  # noqa: F401, I001
