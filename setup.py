"""Builds the one compiled module, dppa/io/_codec.c; everything else is configured in pyproject.toml.

The module is optional: without a C compiler the install goes on and dppa/io/codec.py decodes with numpy and torch.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("dppa.io._codec", ["dppa/io/_codec.c"], extra_compile_args=["-O3"], optional=True)])
