"""Checkpoint I/O: streaming safetensors reading and writing, manifests, atomic output folders."""
