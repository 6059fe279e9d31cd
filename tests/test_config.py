"""params.yaml checking: every mistake is reported before any work, naming the key path."""

import shutil
import sys
from pathlib import Path

import pytest
import yaml

from dppa.errors import DppaError
from dppa.pipeline.config import load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def error_of(data: dict) -> str:
    with pytest.raises(DppaError) as info:
        parse_params(data)
    return str(info.value)


def test_shipped_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.merge.method in ("ties", "task_arithmetic")
    assert set(params.models.finetunes) == {"arith", "facts", "strings"}
    assert params.zoo.regime == "heavy"


def test_density_out_of_range_names_the_key(params):
    params["prune"]["density"] = 1.5
    assert error_of(params) == "params.yaml: prune.density: must be in (0, 1], got 1.5"


def test_unknown_key_names_the_path_and_the_allowed_keys(params):
    params["merge"]["sclae"] = 2.0
    message = error_of(params)
    assert message.startswith("params.yaml: merge.sclae: unknown key")
    assert "scale" in message


def test_unknown_key_inside_a_finetune(params):
    params["models"]["finetunes"]["arith"]["prune"] = {"densty": 0.3}
    message = error_of(params)
    assert message.startswith("params.yaml: models.finetunes.arith.prune.densty: unknown key")
    assert "density" in message


def test_missing_model_path_names_the_key(params, tmp_path):
    params["models"]["finetunes"]["facts"]["source"] = str(tmp_path / "no-such-model")
    message = error_of(params)
    assert message.startswith("params.yaml: models.finetunes.facts.source: no model folder at")
    assert "no-such-model" in message


def test_required_keys(params):
    del params["merge"]["method"]
    del params["prune"]["density"]
    message = error_of(params)
    assert "params.yaml: merge.method: required key is missing" in message
    assert "params.yaml: prune.density: required key is missing" in message


def test_hub_model_needs_a_pinned_revision(params):
    params["models"]["base"] = {"source": "meta-llama/Llama-2-7b-hf"}
    assert "models.base.source: hub model 'meta-llama/Llama-2-7b-hf' needs a `revision`" in error_of(params)
    params["models"]["base"]["revision"] = "01c7f73d771dfac7d292323805ebc428287df4f9"
    assert parse_params(params).models.base.resolve(Path(".")).kind == "hub"


def test_local_model_paths_are_relative_to_the_params_file(params, tmp_path):
    (tmp_path / "models" / "base").mkdir(parents=True)
    params["models"]["base"] = {"source": "models/base"}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    source = load_params(path).models.base.resolve(tmp_path)
    assert (source.kind, source.ref) == ("local", str((tmp_path / "models" / "base").resolve()))


def test_fixed_factors_or_search_not_both(params):
    params["amplify"]["factors"] = [1.8, 1.0]
    assert "amplify: give exactly one of `factors`" in error_of(params)
    del params["amplify"]["search"]
    params["amplify"]["factors"] = [1.8]
    assert "amplify: factors: 1 factors for 2 bands" in error_of(params)


def test_search_refuses_the_test_split(params):
    params["amplify"]["search"]["split"] = "test"
    assert error_of(params).startswith("params.yaml: amplify.search.split:")


def test_merge_weights_must_name_every_finetune(params):
    params["merge"]["weights"] = {"arith": 1.0}
    assert "merge.weights: give one weight per fine-tune" in error_of(params)


def test_task_runner_forms(params):
    for good in ("threads", "local-cluster:2", "local-gpu-cluster", "local-gpu-cluster:0", "tcp://10.0.0.5:8786"):
        params["runtime"]["task_runner"] = good
        assert parse_params(params).runtime.task_runner == good
    for bad in ("dask", "local-gpu-cluster:01", "local-gpu-cluster:two", "local-gpus"):
        params["runtime"]["task_runner"] = bad
        assert error_of(params).startswith(f"params.yaml: runtime.task_runner: {bad!r}: use threads, local-cluster:N")


def test_local_gpu_cluster_settings(params):
    runtime = params["runtime"]
    runtime.update(task_runner="local-gpu-cluster:3", device="auto", gpu_resource=None)
    parsed = parse_params(params).runtime
    assert (parsed.gpu_cluster_cpu_workers(), parsed.needs_gpu_resource()) == (3, True)
    runtime["task_runner"] = "local-gpu-cluster"
    assert parse_params(params).runtime.gpu_cluster_cpu_workers() == 0
    runtime["task_runner"] = "tcp://10.0.0.5:8786"  # a cluster started by hand: only device cuda implies it
    assert parse_params(params).runtime.needs_gpu_resource() is False

    runtime.update(task_runner="local-gpu-cluster", device="cpu")
    assert "but device is cpu: set device: auto or cuda, or use task_runner: local-cluster:N" in error_of(params)
    runtime.update(device="auto", gpu_resource=False)
    assert "gpu_resource: false would let model-heavy stages run on CPU-only workers" in error_of(params)
    # extract and prune follow runtime.device: on a CPU-only worker, device cuda cannot work
    runtime.update(task_runner="local-gpu-cluster:2", device="cuda", gpu_resource=None)
    assert "its 2 CPU-only workers see no GPU, so extract and prune there cannot use device cuda" in error_of(params)
    runtime["task_runner"] = "local-gpu-cluster"
    assert parse_params(params).runtime.needs_gpu_resource() is True


def test_overrides_apply_to_one_finetune_only(params):
    params["models"]["finetunes"]["facts"]["prune"] = {"density": 0.4}
    parsed = parse_params(params)
    assert parsed.prune_for("facts").density == 0.4
    assert parsed.prune_for("arith").density == params["prune"]["density"]
    assert parsed.band_densities("facts") == [0.2, 0.4]
    assert parsed.band_densities("arith") == [0.1, 0.2]


def test_eval_tasks_default_to_every_finetunes_tasks(params):
    assert parse_params(params).eval_tasks() == ["zoo_arith", "zoo_facts", "zoo_strings"]


def test_prune_methods_and_options_come_from_the_registry(params):
    import importlib

    from dppa.sparsify.registry import PRUNERS

    PRUNERS.unregister("toy_top1")  # another test may have imported the plugin
    params["prune"] = {"method": "toy_top1", "toy_power": 2.0, "density": 0.2}
    message = error_of(params)
    assert message.startswith("params.yaml: prune.method: Input should be 'magnitude', 'dare' or 'dp'")
    module = "tests.plugins.toy_pruner"  # registers toy_top1 on import
    importlib.reload(sys.modules[module]) if module in sys.modules else importlib.import_module(module)
    parsed = parse_params(params)
    assert parsed.prune.options().toy_power == 2.0
    params["prune"]["method"] = "no_such_method"
    message = error_of(params)
    assert "prune.method:" in message and all(name in message for name in ("magnitude", "dare", "dp", "toy_top1"))
    params["prune"] = {"method": "toy_top1", "toy_powr": 2.0, "density": 0.2}
    assert error_of(params).startswith("params.yaml: prune.toy_powr: unknown key; allowed keys here:")


def test_method_options_are_checked_by_the_methods_own_options(params):
    params["prune"]["lamda"] = 1.5
    assert error_of(params).startswith("params.yaml: prune: dp options:")


def test_merge_and_search_names_come_from_their_registries(params):
    params["merge"]["method"] = "average"
    assert error_of(params).startswith("params.yaml: merge.method: Input should be 'task_arithmetic' or 'ties'")
    params["merge"]["method"] = "ties"
    params["amplify"]["search"]["strategy"] = "random"
    assert error_of(params).startswith("params.yaml: amplify.search.strategy: Input should be 'coordinate' or")


def test_searched_merge_scale_needs_its_search_section(params):
    assert parse_params(params).merge.scale == "search"  # the shipped default
    del params["merge"]["search"]
    assert "`scale: search` needs a `search` section" in error_of(params)
    params["merge"].update(scale=0.5, search={"grid": [0.5]}, weights=None)
    assert error_of(params) == (
        "params.yaml: merge: `scale: 0.5` is fixed, so nothing is searched: delete `merge.search` (the scale "
        "search's settings)"
    )
    params["merge"].update(scale="search", search={"grid": [0.5, -1.0]})
    assert error_of(params).startswith("params.yaml: merge.search.grid: must be distinct values > 0")
    params["merge"].update(search={"grid": [0.5], "split": "test"})
    assert error_of(params).startswith("params.yaml: merge.search.split:")
    params["merge"].update(search={"grid": [0.5]}, weights="search")
    assert parse_params(params).merge.weights == "search"
    params["merge"].update(scale=0.5, search=None)
    assert "`scale: 0.5` is fixed, so nothing is searched: set `merge.weights` to null" in error_of(params)


def test_fixing_the_demo_merge_scale_names_everything_to_change(params):
    # the natural edit of the shipped params.yaml: a number for the scale, the search settings left in place
    params["merge"]["scale"] = 0.45
    assert error_of(params) == (
        "params.yaml: merge: `scale: 0.45` is fixed, so nothing is searched: delete `merge.search` (the scale "
        "search's settings), and set `merge.weights` to null (all 1) or to one weight per fine-tune"
    )


def test_every_strategy_option_is_settable_and_checked_by_its_strategy(params):
    search = params["amplify"]["search"]
    del search["strategy"]
    assert parse_params(params).amplify.search.strategy == "coordinate"  # the CLI's default too
    search.update(step=0.2, probe_every_band=False)
    parsed = parse_params(params).amplify.search
    assert (parsed.step, parsed.probe_every_band) == (0.2, False)
    search.update(strategy="pattern")
    assert "probe-every-band is an option of coordinate, not of search strategy pattern" in error_of(params)


def test_amplify_tracks_exactly_the_prune_keys_its_dp_bands_use():
    """The bands are DP selections: amplify reruns on the DP options, density and scope, not on the method."""
    import dataclasses

    from dppa.sparsify.registry import PRUNERS

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["amplify"]["do"]
    tracked = {key.removeprefix("prune.") for key in stage["params"] if key.startswith("prune")}
    assert tracked == {"density", "scope", *(f.name for f in dataclasses.fields(PRUNERS.get("dp").options))}


def test_dvc_yaml_is_the_only_place_paths_are_written():
    """The stage commands get every path from dvc.yaml: no data/ path is written in the code that runs them."""
    for module in (
        "dppa/stages/deltas.py",
        "dppa/stages/evaluation.py",
        "dppa/stages/merge.py",
        "dppa/stages/models.py",
        "flows/pipeline.py",
        "dppa/cli/stage.py",
        "dppa/cli/run.py",
        "dppa/pipeline/run_record.py",
    ):
        assert '"data' not in (ROOT / module).read_text() and "'data" not in (ROOT / module).read_text(), module


@pytest.mark.parametrize("command", [["run"], ["stage", "prune", "--model", "arith", "--delta", "d", "--out", "o"]])
def test_commands_refuse_bad_params_before_any_work(tmp_path, params, capsys, command):
    from dppa.cli import main

    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / ".dvc").mkdir()
    params["prune"]["density"] = 1.5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    location = ["-C", str(tmp_path)] if command == ["run"] else ["--params", str(tmp_path / "params.yaml")]
    assert main([*command, *location]) == 2
    assert "params.yaml: prune.density: must be in (0, 1], got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_every_merge_input_names_a_folder_the_stage_graph_writes():
    """dvc.yaml's merge stage reads data/${merge.inputs}: each allowed value must be a folder some stage writes."""
    import typing

    from dppa.pipeline.config import Merge

    graph = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    outs = {
        str(out).split("/${")[0]
        for stage in graph["stages"].values()
        for out in (stage.get("do", stage).get("outs") or [])
    }
    for value in typing.get_args(Merge.model_fields["inputs"].annotation):
        assert f"data/{value}" in outs, f"merge.inputs: {value} reads data/{value}, which no stage writes"


def test_a_merge_only_pipeline_needs_no_tasks(params):
    """Fixed factors, a fixed merge scale and `evaluate.tasks: []`: no fine-tune needs tasks."""
    for entry in params["models"]["finetunes"].values():
        del entry["tasks"]
    params["amplify"] = {"bands": [0.5, 1.0], "factors": [1.8, 1.0]}
    params["merge"].update(scale=0.5, search=None, weights=None)
    params["evaluate"]["tasks"] = []
    parsed = parse_params(params)
    assert parsed.eval_tasks() == []
    assert parsed.not_evaluated() == "evaluate.tasks is empty"
    assert parsed.not_evaluated("arith") == "evaluate.tasks is empty"
    params["evaluate"] = None  # `evaluate: null` says the same
    assert parse_params(params).evaluate.tasks == []
    params["evaluate"] = {"limit": 10}  # nothing names a task: nothing to evaluate either
    assert parse_params(params).not_evaluated() == "no fine-tune names tasks and evaluate.tasks is unset"


def test_evaluation_can_be_turned_off_while_the_searches_keep_their_tasks(params):
    params["evaluate"]["tasks"] = []
    parsed = parse_params(params)
    assert parsed.not_evaluated("facts") == "evaluate.tasks is empty"
    assert parsed.merge.scale == "search" and parsed.finetune("facts").tasks == ["zoo_facts"]
    params["evaluate"]["tasks"] = None
    del params["models"]["finetunes"]["facts"]["tasks"]
    params["models"]["finetunes"]["facts"]["amplify"] = {"factors": [1.5, 1.0]}
    params["merge"].update(scale=0.5, search=None, weights=None)
    parsed = parse_params(params)
    assert parsed.not_evaluated() is None
    assert parsed.not_evaluated("facts") == "models.finetunes.facts.tasks is empty"
    assert parsed.eval_tasks() == ["zoo_arith", "zoo_strings"]


def test_searches_without_tasks_are_refused_naming_the_key(params):
    del params["models"]["finetunes"]["strings"]["tasks"]
    assert error_of(params) == (
        "params.yaml: amplify.search: the factor search scores each fine-tune on its own tasks, but strings has "
        "none (models.finetunes.strings.tasks); give its tasks or fixed amplify.factors"
    )
    params["amplify"] = {"bands": [0.5, 1.0], "factors": [1.8, 1.0]}
    assert error_of(params) == (
        "params.yaml: merge.scale: search scores the merge on the fine-tunes' own tasks, but strings has none "
        "(models.finetunes.strings.tasks); give a number or its tasks"
    )
    params["merge"]["inputs"] = "pruned"  # no amplification at all: only the merge-scale search needs tasks
    params["amplify"] = {"bands": [0.5, 1.0], "search": {"budget": 4}}
    assert error_of(params).startswith("params.yaml: merge.scale: search scores the merge")


def test_notify_takes_a_block_or_a_url_and_never_echoes_it(params):
    for good in ("custom-webhook/nightly", "slack-webhook/team-alerts", "https://hooks.example/T0/B0/s3cret"):
        params["runtime"]["notify"] = good
        assert parse_params(params).runtime.notify == good
    params["runtime"]["notify"] = "ftp://host/s3cret-path"
    message = error_of(params)
    assert message.startswith("params.yaml: runtime.notify: use a Prefect notification block as BLOCK-TYPE/NAME")
    assert "s3cret" not in message


def test_a_finetunes_prune_options_are_checked_by_its_methods_own_options(params):
    params["models"]["finetunes"]["facts"]["prune"] = {"lamda": 1.5}
    assert error_of(params).startswith("params.yaml: models.finetunes.facts.prune: dp options:")
    params["models"]["finetunes"]["facts"]["prune"] = {"method": "magnitude", "lamda": 1.5}  # not magnitude's
    assert parse_params(params).prune_for("facts").method == "magnitude"


def test_an_option_of_the_wrong_type_names_its_key(params):
    params["prune"]["seed"] = "abc"
    assert error_of(params).startswith("params.yaml: prune.seed: Input should be a valid integer")
    params["prune"]["seed"] = "7"  # typed as the method's dataclass declares it
    assert parse_params(params).prune.seed == 7


def test_the_schema_is_plain_classes_one_per_section():
    from dppa.pipeline import config

    sections = {name: field.annotation for name, field in config.Params.model_fields.items()}
    assert sections["prune"] is config.Prune and sections["merge"] is config.Merge
    assert sections["amplify"] is config.Amplify and sections["models"] is config.Models
    assert set(config.Params.model_json_schema()["properties"]) == set(sections)
