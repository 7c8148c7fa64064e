"""Test-split predictions for LaMP's leaderboard: synthetic data with a hidden test
split, `predict_test` leaving cells as they were, the grid that has no test split,
`report --export-test`, and one real grid that predicts its test split, exported
and scored with `evaluate` against the synthetic test golds."""

import json

import pytest
from mlflow.tracking import MlflowClient

from grid import tracking
from grid.run import Workdir, data_predicting_test, pending_cells, run_grid
from grid.spec import parse_grid, with_overrides
from grid.tracking import MlflowLog, leaderboard_file
from lamp.data import find_splits, read_examples, read_outputs
from lamp.errors import LampError
from lamp.synth import TEST_GOLDS, write_synthetic
from tests.cli import call_cli

KEY = "LaMP_2/lamp/BM25/k=2/both/start/offset=0/seed=0/tiny"


def grid(**extra):
    return parse_grid({"name": "predicting", "tasks": ["LaMP_2"], "model": "tiny",
                       "axes": [{"retriever": ["none", "BM25"], "k": [2]}],
                       "training": {"epochs": 1, "lr": 1e-3, "batch_size": 8, "beams": 1}, **extra}, "predicting")


@pytest.fixture(scope="module")
def hidden_test(tmp_path_factory):
    """LaMP_2 with 20 train/dev users and 6 test users, whose golds the loader never reads."""
    out = tmp_path_factory.mktemp("hidden-test")
    write_synthetic(out, ["LaMP_2"], users=20, seed=3, test_users=6)
    return out


def test_synth_writes_a_test_split_whose_golds_the_loader_does_not_read(hidden_test, tmp_path):
    (test,) = [s for s in find_splits(hidden_test) if s.split == "test"]
    assert test.outputs is None and test.questions == hidden_test / "LaMP_2" / "test" / "test_questions.json"
    examples = list(read_examples(test))
    golds = read_outputs(hidden_test / "LaMP_2" / "test" / TEST_GOLDS, "LaMP_2")
    assert [e.id for e in examples] == list(golds) and len(golds) == 6
    assert all(e.output is None for e in examples) and all(golds.values())
    # The train and dev users are those written without a test split, byte for byte.
    write_synthetic(tmp_path, ["LaMP_2"], users=20, seed=3)
    for split in ("train", "dev"):
        for kind in ("questions", "outputs"):
            name = f"LaMP_2/{split}/{split}_{kind}.json"
            assert (tmp_path / name).read_bytes() == (hidden_test / name).read_bytes()
    assert not (tmp_path / "LaMP_2" / "test").exists()
    with pytest.raises(LampError, match="--test-users must be 0 or more"):
        write_synthetic(tmp_path, ["LaMP_2"], users=20, seed=3, test_users=-1)


def test_synth_and_validate_on_the_command_line(tmp_path):
    done = call_cli("synth", "--out", tmp_path, "--tasks", "LaMP_2", "--users", "10", "--test-users", "3")
    assert done.returncode == 0, done.stderr
    done = call_cli("validate", "--data", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "LaMP_2 user-based test: 3 examples" in done.stdout and "(no outputs file: test split)" in done.stdout
    done = call_cli("synth", "--out", tmp_path, "--like-lamp", "--test-users", "3")
    assert done.returncode == 2 and "--like-lamp sets the sizes itself; drop --test-users" in done.stderr


def test_predict_test_changes_no_cell_key_params_or_settings_hash():
    plain, predicting = grid(), grid(predict_test=True)
    assert not plain.predict_test and predicting.predict_test
    assert [(c.key, c.params(), c.settings_hash) for c in plain.cells()] == \
           [(c.key, c.params(), c.settings_hash) for c in predicting.cells()]
    assert not with_overrides(predicting, predict_test=False).predict_test  # the command line's word wins
    assert with_overrides(plain, predict_test=True).predict_test and with_overrides(predicting).predict_test
    with pytest.raises(LampError, match="predict_test must be true or false, got 'yes'"):
        grid(predict_test="yes")


def test_a_task_without_a_test_split_is_named_with_its_data_folder(tmp_path):
    write_synthetic(tmp_path, ["LaMP_2"], users=10, seed=3, test_users=2)
    write_synthetic(tmp_path, ["LaMP_4"], users=10, seed=3)  # train and dev only
    said = []
    spec = parse_grid({"name": "two", "tasks": ["LaMP_2", "LaMP_4"], "axes": [{"retriever": ["none"]}],
                       "predict_test": True}, "two")
    assert data_predicting_test(spec, spec.cells(), tmp_path, said.append) == {("LaMP_2", "user")}
    assert said == [f"--predict-test: LaMP_4 has no test split in {tmp_path}; its cells write no test "
                    "predictions"]
    assert data_predicting_test(with_overrides(spec, predict_test=False), spec.cells(), tmp_path, said.append) == set()
    assert len(said) == 1


def finished_cells(tmp_path, with_test: bool) -> tuple:
    """A real MLflow store with the grid's two cells FINISHED (as a trial leaves them), the
    BM25 cell with test predictions when asked: (tracking URI, the cells, their run ids)."""
    uri = Workdir(tmp_path).tracking_uri
    client = tracking.connect(uri)
    experiment = tracking.experiment_id(client, "predicting", Workdir(tmp_path).artifacts)
    parent = tracking.start_parent(client, experiment, "predicting", {})
    cells = grid(predict_test=True).cells()
    run_ids = [tracking.create_child(client, experiment, parent, c, "data", "predicting", {}, {}) for c in cells]
    if with_test:
        MlflowLog(uri, run_ids[1]).test_predictions("LaMP_2", ["b", "a"], ["comedy", "action"])
    for run_id in run_ids + [parent]:
        client.set_terminated(run_id, "FINISHED")
    return uri, cells, run_ids


def test_a_finished_cell_without_test_predictions_runs_again_only_when_its_task_predicts_test(tmp_path):
    uri, cells, _ = finished_cells(tmp_path, with_test=True)
    client = tracking.connect(uri)
    by_key = tracking.cell_runs(client, tracking.find_experiment(client, "predicting").experiment_id)
    fingerprints = {("LaMP_2", "user"): "data"}
    assert pending_cells(cells, by_key, fingerprints, None, uri, lambda _: None) == []
    pending = pending_cells(cells, by_key, fingerprints, None, uri, lambda _: None, {("LaMP_2", "user")})
    assert [c.key for c in pending] == ["LaMP_2/lamp/none/seed=0/tiny"]


def test_export_gathers_each_cells_test_predictions_in_lamps_format(tmp_path):
    uri, cells, run_ids = finished_cells(tmp_path, with_test=True)
    out = tmp_path / "submit"
    done = call_cli("report", "--experiment", "predicting", "--tracking-uri", uri, "--export-test", out)
    assert done.returncode == 0, done.stderr
    folder = "LaMP_2__lamp__BM25__k=2__both__start__offset=0__seed=0__tiny"
    assert f"{folder}/LaMP_2-test-predictions.json  ({KEY})" in done.stdout
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        folder, f"{folder}/LaMP_2-test-predictions.json"]
    assert json.loads((out / folder / "LaMP_2-test-predictions.json").read_text()) == {
        "task": "LaMP_2", "golds": [{"id": "b", "output": "comedy"}, {"id": "a", "output": "action"}]}
    assert MlflowClient(uri).get_run(run_ids[1]).data.tags[tracking.TEST_PREDICTIONS] == leaderboard_file(
        "LaMP_2")
    again = call_cli("report", "--experiment", "predicting", "--tracking-uri", uri, "--export-test", out)
    assert again.returncode == 2 and "exists and is not an empty folder" in again.stderr


def test_export_without_test_predictions_says_so_and_fails(tmp_path):
    uri, _, _ = finished_cells(tmp_path, with_test=False)
    done = call_cli("report", "--experiment", "predicting", "--tracking-uri", uri, "--export-test", tmp_path / "x")
    assert done.returncode == 2
    assert done.stderr.strip() == ("lamp-grid report: error: none of the 2 cell(s) has test predictions: run the "
                                   "grid with --predict-test (on data with a test split)")
    assert not (tmp_path / "x").exists()
    done = call_cli("report", "--experiment", "predicting", "--tracking-uri", uri)
    assert done.returncode == 2 and "give --out DIR (the report), --export-test DIR" in done.stderr


def test_a_vote_cell_predicts_the_test_split_through_the_shared_finish(hidden_test, tmp_path):
    from grid.model import ModelRef
    from grid.run import RunPlan
    from grid.shards import prepare
    from grid.spec import Resources
    from grid.trial.driver import run_vote

    # The `none` cell ranks nothing: prepare only converts the splits, with no Ray.
    shards = {s.split: s for s in prepare(hidden_test, tmp_path / "cache", retrievers=[], log=lambda _: None)}
    spec = parse_grid({"name": "voting", "tasks": ["LaMP_2"], "model": "vote", "axes": [{"retriever": ["none"]}],
                       "predict_test": True}, "voting")
    (cell,) = spec.cells()
    uri = Workdir(tmp_path).tracking_uri
    client = tracking.connect(uri)
    experiment = tracking.experiment_id(client, "voting", Workdir(tmp_path).artifacts)
    run_id = tracking.create_child(client, experiment, tracking.start_parent(client, experiment, "voting", {}),
                                   cell, "data", "voting", {}, {})
    plan = RunPlan([cell], [run_id], {("LaMP_2", "user"): shards}, {}, ModelRef.named("vote"), uri, str(tmp_path),
                   Resources(), predict_test=spec.predict_test)
    assert set(run_vote(cell, plan, run_id)) == {"dev_accuracy", "dev_f1"}  # test golds are hidden: no test_ metric
    path = client.download_artifacts(run_id, "LaMP_2-test-predictions.json", str(tmp_path))
    golds = hidden_test / "LaMP_2" / "test" / TEST_GOLDS
    done = call_cli("evaluate", "--task", "LaMP_2", "--golds", golds, "--preds", path)
    assert done.returncode == 0, done.stderr
    # No profile, no vote: LaMP_2's fallback, the first tag, for every test user.
    assert {p["output"] for p in json.loads(open(path).read())["golds"]} == {"sci-fi"}


@pytest.mark.slow
def test_a_grid_predicts_its_test_split_and_the_export_scores_against_the_hidden_golds(hidden_test, ray_local,
                                                                                      tmp_path):
    spec = parse_grid({"name": "predicting-one", "tasks": ["LaMP_2"], "model": "tiny", "predict_test": True,
                       "axes": [{"retriever": ["BM25"], "k": [2]}],
                       "training": {"epochs": 1, "lr": 1e-3, "batch_size": 8, "beams": 1}}, "predicting-one")
    said = []
    (result,) = run_grid(spec, str(hidden_test), tmp_path, log=said.append)
    assert result.status == "FINISHED" and result.cell.key == KEY
    assert not any("--predict-test" in line for line in said)  # the data has a test split
    client = MlflowClient(Workdir(tmp_path).tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.tags[tracking.TEST_PREDICTIONS] == "LaMP_2-test-predictions.json"
    assert "LaMP_2-test-predictions.json" in {a.path for a in client.list_artifacts(result.run_id)}
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"LaMP_2-train", "LaMP_2-dev", "LaMP_2-test"}

    out = tmp_path / "submit"
    done = call_cli("report", "--experiment", "predicting-one", "--workdir", tmp_path, "--export-test", out)
    assert done.returncode == 0, done.stderr
    exported = out / "LaMP_2__lamp__BM25__k=2__both__start__offset=0__seed=0__tiny" / "LaMP_2-test-predictions.json"
    predictions = json.loads(exported.read_text())
    golds = read_outputs(hidden_test / "LaMP_2" / "test" / TEST_GOLDS, "LaMP_2")
    assert predictions["task"] == "LaMP_2" and [p["id"] for p in predictions["golds"]] == list(golds)
    assert all(isinstance(p["id"], str) and isinstance(p["output"], str) for p in predictions["golds"])
    done = call_cli("evaluate", "--task", "LaMP_2", "--golds", hidden_test / "LaMP_2" / "test" / TEST_GOLDS,
                    "--preds", exported)
    assert done.returncode == 0, done.stderr
    scores = json.loads(done.stdout)
    assert set(scores) == {"accuracy", "f1"} and 0 <= scores["accuracy"] <= 1
