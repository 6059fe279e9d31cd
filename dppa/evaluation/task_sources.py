"""Where the harness's tasks come from, and the fingerprint of their data that the evaluation cache keys on.

Three kinds of source, all handed to lm-eval's TaskManager the same way:
- packaged sources, found through the ``dppa.task_sources`` entry-point group: each names the tasks it defines,
  writes them as an lm-eval task folder on demand, and fingerprints their data. dppa's own zoo tasks are one
  (pyproject.toml); a package of a team's tasks can add its own without touching dppa;
- folders of lm-eval task YAMLs named in ``DPPA_TASK_PATH`` (os.pathsep-separated) or passed as ``include_path``,
  fingerprinted by their files;
- lm-eval's own registry (hub data sets), versioned by the harness's version, a separate part of the cache key.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

ENTRY_POINT_GROUP = "dppa.task_sources"
TASK_PATH_ENV = "DPPA_TASK_PATH"


@dataclass(frozen=True)
class TaskSource:
    """Tasks that live outside lm-eval's registry."""

    name: str  # the cache key's task-data entry is "<name>_data"
    task_names: Callable[[], Sequence[str]]  # the tasks (and tags) it defines
    folder: Callable[[], Path]  # an lm-eval task folder holding them, written if missing
    fingerprint: Callable[[], str]  # changes whenever any of its task data or configs change


@functools.cache
def packaged_sources() -> tuple[TaskSource, ...]:
    from importlib.metadata import entry_points

    found = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
    return tuple(ep.load() for ep in found)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _folder_task_names(folder: Path) -> tuple[str, ...]:
    names = []
    for path in _files(folder):
        if path.suffix not in (".yaml", ".yml"):
            continue
        try:
            config = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue  # lm-eval reports a broken config when the task is loaded
        if not isinstance(config, dict):
            continue
        tags = config.get("tag") or []
        for name in [config.get("task"), *(tags if isinstance(tags, list) else [tags])]:
            if isinstance(name, str):
                names.append(name)
    return tuple(names)


def _folder_state(folder: Path) -> tuple:
    return tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in _files(folder))


@functools.lru_cache(maxsize=32)
def _folder_fingerprint(folder: Path, state: tuple) -> str:
    del state  # part of the memo key only: a changed file is hashed again
    digest = hashlib.sha256()
    for path in _files(folder):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def folder_source(folder: str | os.PathLike) -> TaskSource:
    """A folder of lm-eval task configs (and the data files they read) as a source."""
    path = Path(folder).resolve()
    return TaskSource(
        name=f"folder:{path}",
        task_names=lambda: _folder_task_names(path),
        folder=lambda: path,
        fingerprint=lambda: _folder_fingerprint(path, _folder_state(path)),
    )


def task_sources(include_path: Sequence[str | os.PathLike] = ()) -> list[TaskSource]:
    """The packaged sources, then the folders of DPPA_TASK_PATH, then `include_path`."""
    env = [p for p in os.environ.get(TASK_PATH_ENV, "").split(os.pathsep) if p]
    return [*packaged_sources(), *(folder_source(p) for p in [*env, *include_path])]


def task_data_versions(tasks: Sequence[str], include_path: Sequence[str | os.PathLike] = ()) -> dict[str, str]:
    """{"<source>_data": fingerprint} for each source that defines one of `tasks`; tasks of lm-eval's own registry
    add nothing here (the harness's version stands for them)."""
    wanted = set(tasks)
    return {
        f"{source.name}_data": source.fingerprint()
        for source in task_sources(include_path)
        if wanted & set(source.task_names())
    }
