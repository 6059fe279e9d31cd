"""Builds the one compiled module, dppa/io/_codec.c, and names the packages; the rest is in pyproject.toml.

The module is optional: without a C compiler the install goes on and dppa/io/codec.py decodes with numpy and torch.
The pipeline's Prefect code lives in the top-level folders flows/ and tasks/ of the repository (where a maintainer
looks for it) but installs as dppa.flows and dppa.tasks: top-level packages of those generic names would collide
with any other package that uses them.
"""

from setuptools import Extension, find_packages, setup

# -ffp-contract=off: the merge kernels round each multiply and each add on its own, as torch does (see _codec.c)
CODEC = Extension(
    "dppa.io._codec",
    ["dppa/io/_codec.c"],
    extra_compile_args=["-O3", "-ffp-contract=off"],
    libraries=["m"],
    optional=True,
)

setup(
    packages=[*find_packages(include=["dppa", "dppa.*"]), "dppa.flows", "dppa.tasks"],
    package_dir={"dppa.flows": "flows", "dppa.tasks": "tasks"},
    ext_modules=[CODEC],
)
