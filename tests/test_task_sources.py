"""Task sources: the zoo's tasks reach the harness through the entry point, a user's folder is fingerprinted."""

import hashlib
import os

import pytest

from dppa.errors import DppaError
from dppa.evaluation.cache import eval_key
from dppa.evaluation.harness import load_tasks
from dppa.evaluation.task_sources import TASK_PATH_ENV, folder_source, packaged_sources, task_data_versions

TASK_YAML = """task: team_echo
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: exact_match
"""


def _folder(tmp_path, answer="b"):
    data = tmp_path / "echo.jsonl"
    data.write_text(f'{{"prompt": "a", "answer": "{answer}"}}\n')
    (tmp_path / "echo.yaml").write_text(TASK_YAML.format(data=data))
    return tmp_path


def test_the_zoo_is_a_packaged_source_with_the_zoo_fingerprint():
    from dppa.zoo.tasks import data_fingerprint

    (zoo,) = [s for s in packaged_sources() if s.name == "zoo"]
    assert "zoo_arith" in zoo.task_names() and "zoo" in zoo.task_names()
    assert task_data_versions(["zoo_arith"]) == {"zoo_data": data_fingerprint()}
    assert task_data_versions(["hellaswag"]) == {}  # lm-eval's registry: versioned by the harness version


def test_a_user_folder_is_fingerprinted_by_its_files(tmp_path, monkeypatch):
    folder = _folder(tmp_path)
    source = folder_source(folder)
    assert source.task_names() == ("team_echo",)
    by_hand = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        by_hand.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    assert source.fingerprint() == by_hand.hexdigest()[:16]

    monkeypatch.setenv(TASK_PATH_ENV, str(folder))
    key = eval_key(model="m", tasks=["team_echo"], split="test", limit=None, recipe={}, compute="float32")
    (folder / "echo.jsonl").write_text('{"prompt": "a", "answer": "changed"}\n')
    os.utime(folder / "echo.jsonl", ns=(1, 1))  # a new size and mtime: hashed again
    assert eval_key(model="m", tasks=["team_echo"], split="test", limit=None, recipe={}, compute="float32") != key


@pytest.mark.slow
def test_user_folder_tasks_load_and_unknown_names_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(TASK_PATH_ENV, str(_folder(tmp_path)))
    loaded = load_tasks(["team_echo", "zoo_arith"], "test")
    assert set(loaded["tasks"]) == {"team_echo", "zoo_arith"}
    monkeypatch.delenv(TASK_PATH_ENV)
    with pytest.raises(DppaError, match="unknown task.*no_such_task_zz.*zoo_arith"):
        load_tasks(["no_such_task_zz"], "test")
