"""Each dvc.yaml stage's code deps, against the project modules its command imports.

    python scripts/code_deps.py            # each stage's code deps as they should be, and what dvc.yaml lists
    python scripts/code_deps.py --check    # exit 1 naming every stage whose deps differ (tests/test_code_deps.py)
    python scripts/code_deps.py --write    # put the computed code deps into dvc.yaml (data deps and comments kept)

A stage's command is `dppa stage NAME`, which calls STAGES[NAME] (dppa/stages/). The stage's modules are found by
reading the code, not by running it:
- the stage function's own file, the imports inside the function and inside the helpers of that file it calls,
  and the file's top-level imports;
- from there, every unit reached: a function imported from a module brings that module's top level and the
  function (with the same-file helpers it names); anything else imported brings the module's top level; imports
  inside functions count (a lazy import still runs when its function does); package `__init__.py` files on the way.
Left out, as they compute nothing a stage writes: the command wrapper (dppa/cli/, dppa/stages/__init__.py's table)
and dppa/__init__.py (the version string). Data a module reads counts wherever the module does (COMPANIONS: the
compiled codec's source, the shipped zoo bases). A folder is
listed when every module under it is reached, else its files. Imports of names built at run time (importlib) are not
seen, with one exception: the task sources that dppa/evaluation/task_sources.py loads through the entry points of
pyproject.toml (the zoo's tasks) count wherever that module does.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "dppa"
LEFT_OUT = {"dppa/__init__.py", "dppa/stages/__init__.py"}
STAGE_MODULES = ("models", "deltas", "merge", "evaluation")
# {module: what it reads that changes what it computes}: the compiled codec's source, the pre-trained zoo bases
COMPANIONS = {"dppa/io/codec.py": "dppa/io/_codec.c", "dppa/zoo/shipped.py": "dppa/zoo/bases"}


def module_file(name: str) -> Path | None:
    """The file of project module `name` (dppa.x.y), a package's __init__.py, or None."""
    path = ROOT.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


Unit = tuple[str, str | None]  # (module, one of its functions), or (module, None): its top level


class Module:
    """A project module's imports: those of its top level (class bodies included: a class's methods are taken
    whole) and those of each top-level function, with the same-file functions each one refers to."""

    def __init__(self, name: str):
        self.name = name
        self.file = module_file(name)
        tree = ast.parse(self.file.read_text())
        self.functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        self.top = [n for n in tree.body if not isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]

    def units(self, function: str | None) -> set[Unit]:
        """What running the top level and (when given) `function` imports: a function the top level imports
        counts as run when a reached function names it, or the top level calls it."""
        bodies = []
        if function is not None:
            reached, todo = set(), [function]
            while todo:
                name = todo.pop()
                if name in reached:
                    continue
                reached.add(name)
                node = self.functions[name]
                arguments = {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)}  # these shadow
                referred = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} - arguments
                todo.extend(referred & set(self.functions))
            bodies = [self.functions[n] for n in reached]
        called = {
            n.func.id
            for node in self.top
            for n in ast.walk(node)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
        }
        bodies += [self.functions[n] for n in called & set(self.functions)]  # top-level code runs these
        used = called | {n.id for body in bodies for n in ast.walk(body) if isinstance(n, ast.Name)}
        return imported(self.top, used) | imported(bodies, None)


def imported(nodes, used: set[str] | None) -> set[Unit]:
    """The units the import statements among `nodes` (walked) bring in, packages on the way included:
    `from M import f` (f a function of M) is (M, f) when f is in `used` (None: everything imported is used), else
    M's top level; `from M import sub` (a module) is (M.sub, None); anything else is M's top level."""
    units: set[Unit] = set()
    for node in nodes:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                pairs = [(a.name, None, None) for a in sub.names]
            elif isinstance(sub, ast.ImportFrom) and sub.module and not sub.level:
                pairs = [(sub.module, a.name, a.asname or a.name) for a in sub.names]
            else:
                continue
            for module, name, alias in pairs:
                parts = module.split(".")
                if parts[0] != PACKAGE:
                    continue
                units.update((".".join(parts[:i]), None) for i in range(1, len(parts)))  # the packages' inits
                if name is not None and module_file(f"{module}.{name}") is not None:
                    units.add((f"{module}.{name}", None))
                elif module_file(module) is not None:
                    runs = name in MODULES(module).functions and (used is None or alias in used)
                    units.add((module, name if runs else None))
    return {u for u in units if module_file(u[0]) is not None}


_MODULES: dict[str, Module] = {}


def MODULES(name: str) -> Module:  # noqa: N802 - a cache that reads as a table
    if name not in _MODULES:
        _MODULES[name] = Module(name)
    return _MODULES[name]


def entry_point_units() -> dict[str, set[Unit]]:
    """{module that loads an entry-point group: the units the group's entries name}, from pyproject.toml."""
    import tomllib

    groups = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("entry-points", {})
    loaders = {"dppa.task_sources": "dppa.evaluation.task_sources"}
    return {
        loader: {(target.split(":")[0], None) for target in groups.get(group, {}).values()}
        for group, loader in loaders.items()
    }


def closure(start: set[Unit]) -> set[Path]:
    """The files of the units in `start` and of every unit they import, transitively."""
    seen: set[Unit] = set()
    todo = list(start)
    while todo:
        unit = todo.pop()
        if unit in seen:
            continue
        seen.add(unit)
        if module_file(unit[0]).relative_to(ROOT).as_posix() not in LEFT_OUT:  # the wrapper's own imports
            todo.extend(MODULES(unit[0]).units(unit[1]) - seen)
            todo.extend(ENTRY_POINTS.get(unit[0], set()) - seen)
    return {module_file(module) for module, _ in seen}


ENTRY_POINTS = entry_point_units()


def stage_files(stage: str) -> set[Path]:
    """The project files stage `stage`'s command runs: the closure of its function in dppa/stages/."""
    for module in STAGE_MODULES:
        name = f"{PACKAGE}.stages.{module}"
        if stage in MODULES(name).functions:
            files = closure({(name, stage)}) - {ROOT / p for p in LEFT_OUT}
            return files | {ROOT / data for module, data in COMPANIONS.items() if ROOT / module in files}
    raise KeyError(f"stage function {stage!r} not found in dppa/stages/")


def as_deps(files: set[Path]) -> list[str]:
    """Relative paths, a folder standing for its files when every module under it is in `files`."""
    rel = {f.relative_to(ROOT).as_posix() for f in files}
    folders = sorted(
        {p.rsplit("/", 1)[0] for p in rel if "/" in p.removeprefix(PACKAGE + "/")},
        key=lambda folder: folder.count("/"),
    )
    deps = set(rel)
    for folder in folders:
        members = {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*.py")} - LEFT_OUT
        members |= {data for data in COMPANIONS.values() if data.startswith(folder + "/")}
        if members and members <= rel and not any(folder.startswith(d + "/") for d in deps if "." not in d):
            deps = {d for d in deps if not d.startswith(folder + "/")} | {folder}
    return sorted(deps)


def listed_deps(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, tuple[str, list[str]]]:
    """{dvc.yaml stage: (its stage function, its code deps as listed)}."""
    return _stages(dvc_yaml.read_text())


def _stages(text: str) -> dict[str, tuple[str, list[str]]]:
    out = {}
    for key, stage in yaml.safe_load(text)["stages"].items():
        body = stage.get("do", stage)
        function = body["cmd"].split()[2]  # dppa stage NAME ...
        out[key] = (function, sorted(d for d in body.get("deps", []) if d.startswith(PACKAGE + "/")))
    return out


def differences() -> list[str]:
    """One line per stage whose listed code deps differ from the computed ones."""
    lines = []
    for key, (function, listed) in listed_deps().items():
        wanted = as_deps(stage_files(function))
        if listed != wanted:
            missing, extra = sorted(set(wanted) - set(listed)), sorted(set(listed) - set(wanted))
            lines.append(f"dvc.yaml stage {key}: add {missing or 'nothing'}, remove {extra or 'nothing'}")
    return lines


CODE_DEP = re.compile(rf"^\s+- {PACKAGE}/")


def rewrite(text: str) -> str:
    """dvc.yaml's text with each stage's code deps (`- dppa/...` lines of its deps list) replaced by the computed
    ones, after its other deps; every other line as it was."""
    functions = {key: function for key, (function, _) in _stages(text).items()}
    out: list[str] = []
    stage, indent = None, None  # indent: of the items of the deps list being read, None outside one
    for line in text.splitlines():
        key = re.match(r"^  (\w+):\s*$", line)
        if (
            indent is not None
            and line.strip()
            and not line.startswith(indent + "-")
            and not line.lstrip().startswith("#")
        ):  # the deps list ended: the computed code deps close it
            out.extend(f"{indent}- {dep}" for dep in as_deps(stage_files(functions[stage])))
            indent = None
        if key:
            stage = key.group(1)
        if indent is not None and CODE_DEP.match(line):
            continue
        out.append(line)
        if re.match(r"^\s+deps:\s*$", line) and stage in functions:
            indent = " " * (len(line) - len(line.lstrip()) + 2)
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when dvc.yaml's code deps differ")
    parser.add_argument("--write", action="store_true", help="put the computed code deps into dvc.yaml")
    args = parser.parse_args()
    if args.write:
        path = ROOT / "dvc.yaml"
        path.write_text(rewrite(path.read_text()))
    if not args.check:
        for key, (function, listed) in listed_deps().items():
            print(f"{key} (dppa stage {function}):")
            for dep in as_deps(stage_files(function)):
                print(f"  - {dep}{'' if dep in listed else '   # not listed'}")
    lines = differences()
    for line in lines:
        print(line, file=sys.stderr)
    return 1 if lines and args.check else 0


if __name__ == "__main__":
    raise SystemExit(main())
