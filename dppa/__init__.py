"""DPPA: Dynamic Pruning + Dynamic Partition Amplification for merging fine-tuned LLMs.

The engine (this package) is plain PyTorch: no Prefect or DVC import anywhere under ``dppa/``.
"""

__version__ = "0.1.0"
