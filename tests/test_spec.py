"""Grid specs: expansion into cells, and refusals before anything starts."""

import subprocess
import sys

import pytest

from grid.spec import load_grid, parse_grid, with_overrides
from lamp.errors import LampError


def spec(**overrides):
    raw = {"name": "g", "tasks": ["LaMP_2", "LaMP_3"], "axes": [
        {"retriever": ["none", "BM25"], "ablation": ["both", "only_output"], "k": [2]},
        {"retriever": ["Mixed"], "input_retriever": ["BM25"], "output_retriever": ["Random"], "k": [0.5]},
    ], "seeds": [0, 1]}
    return parse_grid({**raw, **overrides}, "test")


def test_cells_cross_the_axes_and_none_is_one_cell_per_task_and_seed():
    cells = spec().cells()
    keys = [c.key for c in cells]
    assert len(keys) == len(set(keys))
    # per task and seed: none once, BM25 x 2 ablations, Mixed once
    assert len(cells) == 2 * 2 * (1 + 2 + 1)
    assert "LaMP_2/lamp/Mixed(BM25>Random)/k=0.5/both/start/offset=0/seed=1/tiny" in keys
    assert sum(1 for c in cells if c.cell.retriever == "none") == 4


def test_the_recipe_is_an_axis_with_a_grid_default_and_a_command_line_override():
    from grid.spec import GridCell

    grid = spec(recipe="study", axes=[{"retriever": ["none", "BM25"], "k": [4]},
                                      {"recipe": ["lamp"], "retriever": ["BM25"], "k": [4], "rank_offset": [1]}])
    keys = {c.key for c in grid.cells() if c.cell.task == "LaMP_2" and c.cell.seed == 0}
    assert keys == {"LaMP_2/study/none/seed=0/tiny", "LaMP_2/study/BM25/k=4/both/start/offset=0/seed=0/tiny",
                    "LaMP_2/lamp/BM25/k=4/both/start/offset=1/seed=0/tiny"}
    everything_lamp = with_overrides(grid, recipe="lamp").cells()
    assert {c.cell.recipe for c in everything_lamp} == {"lamp"} and len(everything_lamp) == len(grid.cells())
    # A study offset may be a share of the profile; the params an MLflow run keeps give the cell back.
    share = spec(recipe="study", axes=[{"retriever": ["BM25"], "k": [0.5], "rank_offset": [0.25]}]).cells()[0]
    assert share.params()["recipe"] == "study"
    params = {name: str(value) for name, value in share.params().items()}
    assert GridCell.from_params(params, "run") == share
    with pytest.raises(LampError, match="unknown recipe 'paper'; valid: lamp, study"):
        spec(recipe="paper").cells()


def test_invalid_cells_are_refused_with_the_cell_named():
    bad = spec(tasks=["LaMP_1"])  # Mixed on LaMP_1
    with pytest.raises(LampError, match=r"grid 'g': cell LaMP_1/lamp/Mixed\(BM25>Random\).*LaMP_1"):
        bad.cells()


@pytest.mark.parametrize("change, message", [
    ({"axes": [{"retriver": ["BM25"]}]}, "unknown axis 'retriver'"),
    ({"training": {"learning_rate": 1}}, "unknown setting 'learning_rate'"),
    ({"tasks": ["LaMP_6"]}, "not public"),
    ({"axes": []}, "non-empty list"),
    ({"colour": "red"}, "unknown key"),
    ({"published": {"LaMP_2": {"curves": {}}}}, "published: a mapping with a source"),
    ({"published": {"source": "a paper", "LaMP_2": {"bars": {}}}}, "published: LaMP_2: a mapping of change"),
])
def test_bad_specs_are_refused(change, message):
    with pytest.raises(LampError, match=message):
        spec(**change)


def test_yaml_files_and_overrides(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("name: y\ntasks: [LaMP_4]\naxes:\n  - retriever: [BM25]\n    k: [1, 2]\n")
    loaded = with_overrides(load_grid(str(path)), model="vote", seeds=[3], epochs=0)
    assert [c.key for c in loaded.cells()] == ["LaMP_4/lamp/BM25/k=1/both/start/offset=0/seed=3/vote",
                                              "LaMP_4/lamp/BM25/k=2/both/start/offset=0/seed=3/vote"]
    assert loaded.training.epochs_for("LaMP_4") == 0
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(LampError, match="malformed YAML"):
        load_grid(str(tmp_path / "bad.yaml"))
    with pytest.raises(LampError, match="unknown grid"):
        load_grid("nope")


def test_training_settings_take_their_types_from_yaml_text(tmp_path):
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text("name: g\ntasks: [LaMP_2]\naxes: [{retriever: [none]}]\n"
                         "training: {lr: 1e-3, epochs: 2, limit_dev: null}\n")
    training = load_grid(str(grid_file)).training
    assert training.lr == 0.001 and training.epochs == 2 and training.limit_dev is None


@pytest.mark.parametrize("setting, message", [({"lr": "fast"}, "lr must be a number, got 'fast'"),
                                              ({"epochs": 1.5}, "epochs must be a whole number"),
                                              ({"batch_size": None}, "batch_size must be a whole number")])
def test_bad_training_settings_are_refused(setting, message):
    with pytest.raises(LampError, match=f"test: training: {message}"):
        spec(training=setting)


def test_a_cell_is_rebuilt_from_the_params_it_logs():
    from grid.spec import GridCell

    for cell in spec(training={"lr": 1e-3, "epochs": 3}).cells():
        params = {k: str(v) for k, v in cell.params().items()}  # MLflow keeps text
        assert GridCell.from_params(params, "run") == cell


def test_an_arm_is_its_cells_across_seeds():
    cells = spec().cells()
    arms = {c.arm for c in cells}
    assert len(arms) == len(cells) // 2  # two seeds
    assert "LaMP_3/lamp/BM25/k=2/only_output/start/offset=0/tiny" in arms


def test_a_quick_look_with_the_tiny_model_takes_its_schedule():
    from grid.tiny import TINY_TRAINING

    study = spec(model="google/flan-t5-base", data="LaMP")
    assert study.data == "LaMP" and study.training.lr == 5e-5
    quick = with_overrides(study, model="tiny", epochs=1)
    assert quick.model == "tiny" and quick.training.lr == TINY_TRAINING["lr"] and quick.training.epochs == 1
    zero_shot = with_overrides(spec(model="google/flan-t5-base", training={"epochs": 0}), model="tiny")
    assert zero_shot.training.epochs == 0
    assert with_overrides(study).training == study.training


def test_the_named_experiments_are_listed_with_their_cell_counts():
    from tests.cli import call_cli

    done = call_cli("list")
    assert done.returncode == 0, done.stderr
    counts = {line.split()[0]: int(line.split()[1]) for line in done.stdout.splitlines()}
    # fig-b: 2 ablations x 9 k x 3 seeds; fig-c: 3 orders x 5 fractions x 3 seeds;
    # fig-b-recipes: fig-b x 2 recipes; mixed: 4 tasks x (none + Random/Random, BM25/Random, Random/BM25)
    # x 3 seeds; zero-shot: 6 tasks x 5 retrievers, one seed, per model (XL, XXL); lamp-baselines: 6 tasks
    # x 2 settings x 4 retrievers.
    assert counts == {"demo": 12, "paper-fig-a": 15, "paper-fig-b": 54, "paper-fig-b-recipes": 108,
                      "paper-fig-c": 45, "paper-ablation": 60, "paper-mixed": 48, "paper-zero-shot": 30,
                      "paper-zero-shot-xxl": 30, "lamp-baselines": 48}


def test_a_reader_that_goes_away_ends_the_listing_quietly():
    from tests.cli import ROOT

    # `list | head -1`: the pipe's far end is closed before the listing is written.
    process = subprocess.Popen([sys.executable, str(ROOT / "experiments.py"), "list"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 1
    assert stderr == ""
