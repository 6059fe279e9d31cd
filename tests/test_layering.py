"""Arrows point down: the engine imports no orchestration or harness, and only the CLI imports the flows."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = [
    "dppa.io",
    "dppa.sparsify",
    "dppa.merging",
    "dppa.extract",
    "dppa.compute",
    "dppa.registry",
    "dppa.architectures",
]
FORBIDDEN = ["prefect", "dvc", "lm_eval", "dppa.flows", "dppa.tasks", "distributed"]


def test_engine_packages_load_no_orchestration_or_harness():
    code = (
        f"import sys\nimport {', '.join(ENGINE)}\n"
        f"print(sorted(f for f in {FORBIDDEN!r} if any(m == f or m.startswith(f + '.') for m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def imported_roots(path: Path) -> set[str]:
    """The imported modules' first two name parts (dppa.flows, prefect.x, ...)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(".".join(alias.name.split(".")[:2]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(".".join(node.module.split(".")[:2]))
    return roots


def test_only_the_cli_imports_flows_and_tasks():
    below_cli = [p for p in (ROOT / "dppa").rglob("*.py") if "cli" not in p.relative_to(ROOT / "dppa").parts]
    offenders = {str(p.relative_to(ROOT)) for p in below_cli if imported_roots(p) & {"dppa.flows", "dppa.tasks"}}
    assert not offenders


def test_the_flows_and_tasks_install_inside_dppa():
    import dppa.flows
    import dppa.tasks

    assert Path(dppa.flows.__file__).resolve().parent == ROOT / "flows"
    assert Path(dppa.tasks.__file__).resolve().parent == ROOT / "tasks"


def test_evaluation_imports_nothing_from_the_zoo():
    # the zoo hands its tasks to the harness as a task source (dppa.evaluation.task_sources), like any other
    evaluation = (ROOT / "dppa" / "evaluation").rglob("*.py")
    offenders = {str(p.relative_to(ROOT)) for p in evaluation if "dppa.zoo" in imported_roots(p)}
    assert not offenders
