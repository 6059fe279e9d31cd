"""Which stages the pipeline flow hands to DVC: the changed ones and every stage downstream of one (a hand graph)."""

from __future__ import annotations

from dppa.pipeline.stage_graph import will_change

# fetch@a -> extract@a -> prune@a \
#                                  merge -> evaluate -> report
# fetch@b -> extract@b -> prune@b /                      ^
# zoo ---------------------------------------------------+   (report reads the zoo's card too)
GRAPH = {
    "zoo": [],
    "fetch@a": [],
    "fetch@b": [],
    "extract@a": ["fetch@a"],
    "extract@b": ["fetch@b"],
    "prune@a": ["extract@a"],
    "prune@b": ["extract@b"],
    "merge": ["prune@a", "prune@b"],
    "evaluate": ["merge"],
    "report": ["evaluate", "zoo"],
}


def test_nothing_changed_runs_nothing():
    assert will_change(GRAPH, set()) == set()


def test_a_changed_stage_brings_everything_downstream_and_nothing_beside_it():
    assert will_change(GRAPH, {"extract@a"}) == {"extract@a", "prune@a", "merge", "evaluate", "report"}
    assert will_change(GRAPH, {"report"}) == {"report"}
    assert will_change(GRAPH, {"zoo", "prune@b"}) == {"zoo", "prune@b", "merge", "evaluate", "report"}


def test_a_stage_downstream_of_two_changes_is_listed_once():
    assert will_change(GRAPH, {"fetch@a", "fetch@b"}) == set(GRAPH) - {"zoo"}
