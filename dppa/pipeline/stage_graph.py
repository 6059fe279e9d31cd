"""The pipeline's stages as DVC sees them, read once per run: `dppa run` asks before it starts anything (a run with
nothing stale ends there) and hands the same reading to the pipeline flow. Light: no Prefect."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FETCH_COMMAND = "dppa stage fetch "  # the command of dvc.yaml's fetch stages
SHOWN = ("report", "publish")  # the stages whose outputs `dppa run` prints at the end


@dataclass(frozen=True)
class StageGraph:
    upstream: dict[str, list[str]]  # {stage: the stages it depends on}, in a topological order (dependencies first)
    fetches: dict[str, Path]  # {fetch stage: its output folder}
    stale: frozenset[str]  # the stages DVC finds stale (as `dvc status` does)
    shown: dict[str, Path]  # {SHOWN stage of the project's dvc.yaml: its first output}


def read_stage_graph(root: Path) -> StageGraph:
    """The stages of ROOT/dvc.yaml and of whatever they depend on, from one DVC index (DVC parses dvc.yaml and
    dvc.lock once: a run with nothing to do is mostly this). Stages of another dvc.yaml are FILE:NAME."""
    import networkx as nx
    from dvc.repo import Repo, lock_repo

    def address(stage) -> str:
        # DVC's own `addressing` is relative to the working folder, which need not be the project.
        dvcfile = Path(stage.dvcfile.path).resolve()
        return stage.name if dvcfile == root / "dvc.yaml" else f"{dvcfile.relative_to(root)}:{stage.name}"

    def first_output(stage) -> Path:
        return root / stage.outs[0].def_path

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        # The pipeline is the project's dvc.yaml (and whatever it depends on), not every dvc.yaml in the
        # repository: experiments may keep their own stage files in subfolders.
        mine = {s for s in graph if Path(s.dvcfile.path).resolve() == root / "dvc.yaml"}
        graph = graph.subgraph(mine.union(*(nx.descendants(graph, s) for s in mine)))
        order = list(reversed(list(nx.topological_sort(graph))))
        with lock_repo(repo):  # as `dvc status` holds it
            stale = frozenset(address(s) for s in order if s.status(check_updates=True))
        return StageGraph(
            upstream={address(s): [address(up) for up in graph.successors(s)] for s in order},
            fetches={address(s): first_output(s) for s in order if (s.cmd or "").startswith(FETCH_COMMAND) and s.outs},
            stale=stale,
            shown={s.name: first_output(s) for s in mine if s.name in SHOWN and s.outs},
        )


def will_change(graph: dict[str, list[str]], changed: set[str]) -> set[str]:
    """The stages of `graph` ({stage: its upstream stages}, dependencies first) that are in `changed` or depend on
    one, directly or not: the stages whose inputs may differ once the stages before them ran. The others are up to
    date now and stay so through the run, since nothing they depend on runs."""
    to_run: set[str] = set()
    for stage, upstream in graph.items():
        if stage in changed or to_run.intersection(upstream):
            to_run.add(stage)
    return to_run
