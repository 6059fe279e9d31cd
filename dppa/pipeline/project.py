"""A new pipeline project for a user's own models (`dppa init`), running on the installed package.

The project gets this package's stage graph (`dvc.yaml`, without the code dependencies, which name this repository's
source folders: the installed package's version is recorded in `dppa_version.txt`, a dependency of every stage,
instead), a `params.yaml` made from this package's own (its comments kept) with the models given, `.gitignore`,
`.dvcignore` and a README, a git repository and a DVC repository. The folder appears complete or not at all.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import yaml

from dppa import __version__
from dppa.errors import DppaError
from dppa.io.atomic import atomic_dir
from dppa.pipeline.config import parse_params

CODE_DEP = re.compile(r"^\s+- (?:dppa|flows|tasks)(?:/\S*)?\s*(?:#.*)?$")
VERSION_FILE = "dppa_version.txt"
GITIGNORE = """\
# what DVC tracks (data/) and what runs leave behind
/data/cache
/data/runs
.*.tmp-*
.*.old-*
"""
README = """\
# {name}: a DPPA merge pipeline

Made by `dppa init`. The models and every setting are in `params.yaml`; the stages are in `dvc.yaml`.

```bash
dppa run            # fetch, extract, prune (DP), amplify (searched factors), merge, evaluate, report
dvc metrics show    # the scores; `dvc plots show` for the search and merge traces
dvc exp run -S prune.density=0.3     # the same pipeline with one setting changed
```

`dppa run --help` and `dppa COMMAND --help` explain each step; `dvc remote add` and `dvc push` share the artifacts.
"""


def _template(name: str) -> str:
    return resources.files("dppa.pipeline").joinpath(f"template.{name}").read_text()


def parse_model(text: str, flag: str) -> dict:
    """A model source from the command line: a local folder (made absolute) or ORG/NAME@REVISION on the hub."""
    path = Path(text).expanduser()
    if path.exists():
        return {"source": str(path.resolve())}
    repo, _, revision = text.partition("@")
    if repo.count("/") != 1 or not revision:
        raise DppaError(f"{flag} {text}: neither a folder nor a hub model ORG/NAME@REVISION (a branch, tag or commit)")
    return {"source": repo, "revision": revision}


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key or not rest:
            raise DppaError(f"{flag} {value}: give NAME=VALUE")
        pairs[key] = rest
    return pairs


def _set(params: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = params
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise DppaError(f"--set {dotted}: {key} is not a section of params.yaml")
    node[last] = value


def _params_text(models: dict | None, settings: dict, zoo: str | None = None) -> str:
    """This package's params.yaml with `models` in place of its models section (None: the zoo's models, built at
    zoo size `zoo`) and `settings` ({dotted key: value}) applied; the comments of the sections left alone are kept."""
    text = _template("params.yaml")
    if models is not None:
        start = re.search(r"^models:\n", text, re.M)
        end = re.search(r"^zoo:", text, re.M)
        block = yaml.safe_dump({"models": models}, sort_keys=False)
        text = text[: start.start()] + block + "\n" + text[end.start() :]
    # without a zoo, the demo zoo is not built
    text = re.sub(r"^(  size: )[\w-]+", rf"\g<1>{zoo or 'none'}", text, count=1, flags=re.M)
    if settings:
        params = yaml.safe_load(text)
        for key, value in settings.items():
            _set(params, key, value)
        text = "# Made by `dppa init`; every key is explained in dppa's own params.yaml.\n" + yaml.safe_dump(
            params, sort_keys=False
        )
    return text


def init_project(
    folder: str | Path,
    base: str | None,
    finetunes: list[str],
    tasks: list[str] = (),
    settings: list[str] = (),
    zoo: str | None = None,
) -> Path:
    """Create the project at `folder` (refused if it exists); returns it. `zoo`: a project on the zoo of that size
    (its base and fine-tunes built by the zoo stage) instead of the user's models."""
    folder = Path(folder).resolve()
    if folder.exists():
        raise DppaError(f"{folder}: exists; dppa init makes a new project folder (give a new path)")
    if zoo is not None:
        if base or finetunes or tasks:
            raise DppaError("--zoo makes a project on the zoo's own models: leave out --base, --finetune and --tasks")
        return _write_project(folder, _params_text(None, _settings(settings), zoo))
    if base is None:
        raise DppaError("give --base SOURCE (or --zoo SIZE for a project on the zoo's models)")
    if not finetunes:
        raise DppaError("give at least one --finetune NAME=SOURCE")
    task_lists = {name: [t for t in value.split(",") if t] for name, value in _pairs(tasks, "--tasks").items()}
    sources = _pairs(finetunes, "--finetune")
    unknown = sorted(set(task_lists) - set(sources))
    if unknown:
        raise DppaError(f"--tasks {unknown[0]}=...: no --finetune of that name ({', '.join(sources)})")
    models = {
        "base": parse_model(base, "--base"),
        "finetunes": {
            name: {**parse_model(source, f"--finetune {name}="), "tasks": task_lists.get(name, [])}
            for name, source in sources.items()
        },
    }
    return _write_project(folder, _params_text(models, _settings(settings)))


def _settings(settings: list[str]) -> dict:
    return {key: yaml.safe_load(value) for key, value in _pairs(settings, "--set").items()}


def _write_project(folder: Path, params_text: str) -> Path:
    parse_params(yaml.safe_load(params_text), source=f"{folder}/params.yaml", root=folder)  # one line if wrong
    with atomic_dir(folder) as tmp:
        (tmp / "params.yaml").write_text(params_text)
        (tmp / "dvc.yaml").write_text(_with_version_dep(_template("dvc.yaml")))
        (tmp / VERSION_FILE).write_text(f"{__version__}\n")
        (tmp / ".gitignore").write_text(GITIGNORE)
        (tmp / ".dvcignore").write_text(_template("dvcignore"))
        (tmp / "README.md").write_text(README.format(name=folder.name))
        for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
            done = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
            if done.returncode != 0:
                raise DppaError(f"{folder}: `{' '.join(command[-3:])}` failed: {done.stderr.strip().splitlines()[-1:]}")
    return folder


def _with_version_dep(text: str) -> str:
    """dvc.yaml without the dependencies on this repository's code, and with the package version file instead."""
    lines = []
    for line in text.splitlines():
        if CODE_DEP.match(line):
            continue
        lines.append(line)
        if line.strip() == "deps:":
            indent = len(line) - len(line.lstrip()) + 2
            lines.append(" " * indent + f"- {VERSION_FILE}   # the dppa version that computes the stages")
    return "\n".join(lines) + "\n"
