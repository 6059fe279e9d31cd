"""dvc.yaml's code deps equal the project files each stage's command imports (scripts/code_deps.py computes them)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def code_deps():
    spec = importlib.util.spec_from_file_location("code_deps", ROOT / "scripts" / "code_deps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dvc_yaml_code_deps_match_the_imports():
    differences = code_deps().differences()
    assert not differences, "run `python scripts/code_deps.py --write`:\n" + "\n".join(differences)


def test_the_closure_follows_functions_not_whole_modules():
    deps = code_deps()
    # a hand-checked case: extract reaches dppa/extract.py through the lazy import inside the stage function, and
    # nothing of the search, the merge or the zoo (other functions of the same files import those)
    extract = {p.relative_to(ROOT).as_posix() for p in deps.stage_files("extract")}
    assert {"dppa/extract.py", "dppa/stages/deltas.py", "dppa/io/writer.py", "dppa/io/_codec.c"} <= extract
    assert not any(p.startswith(("dppa/search/", "dppa/merging/", "dppa/zoo/", "dppa/cli/")) for p in extract)
    amplify = {p.relative_to(ROOT).as_posix() for p in deps.stage_files("amplify")}
    assert "dppa/search/runner.py" in amplify and "dppa/merging/merge.py" not in amplify
    # the zoo's tasks reach the evaluation only through pyproject.toml's entry point, and still count
    assert {"dppa/evaluation/task_sources.py", "dppa/zoo/tasks.py", "dppa/zoo/domains.py"} <= amplify


def test_no_code_dep_is_an_empty_file():
    # DVC warns "'dppa/x/__init__.py' is empty." on every run for each stage that lists an empty file
    deps = code_deps()
    listed = {p for stage in ("zoo", "extract", "amplify", "merge", "report") for p in deps.stage_files(stage)}
    assert {p.relative_to(ROOT).as_posix() for p in listed if p.stat().st_size == 0} == set()


def test_a_missing_or_stale_dep_is_named(tmp_path):
    deps = code_deps()
    text = (ROOT / "dvc.yaml").read_text()
    publish = "\n      - dppa/pipeline/publish.py\n"  # a stage without foreach: six spaces
    broken = text.replace("\n        - dppa/extract.py\n", "\n", 1).replace(
        publish, publish + "      - dppa/zoo/check.py\n"
    )
    assert broken.count("dppa/extract.py") == text.count("dppa/extract.py") - 1
    (tmp_path / "dvc.yaml").write_text(broken)
    listed = deps.listed_deps(tmp_path / "dvc.yaml")
    wanted = {key: deps.as_deps(deps.stage_files(function)) for key, (function, _) in listed.items()}
    assert "dppa/extract.py" in set(wanted["extract"]) - set(listed["extract"][1])
    assert "dppa/zoo/check.py" in set(listed["publish"][1]) - set(wanted["publish"])
    assert deps.rewrite(broken) == text  # --write puts both back
