"""`run` on real local Ray with the tiny model: Tune trials that fine-tune with
Ray Train + DeepSpeed ZeRO on CPU, tracked in a real MLflow store."""

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from grid.run import Workdir, run_grid
from grid.spec import Resources, parse_grid
from lamp.synth import write_synthetic
from tests.cli import ROOT, run_cli

TRAINING = {"epochs": 1, "lr": 1e-3, "batch_size": 8, "beams": 1}


def grid(name, axes, **training):
    return parse_grid({"name": name, "tasks": ["LaMP_2"], "model": "tiny", "axes": axes,
                       "training": {**TRAINING, **training}}, name)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("work")
    write_synthetic(root / "data", ["LaMP_2"], users=60, seed=0)
    return root


def runs(workdir, experiment_name, uri=None):
    client = MlflowClient(uri or Workdir(workdir).tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    return client, client.search_runs([experiment.experiment_id])


def cells_of(all_runs):
    return [r for r in all_runs if r.data.tags.get("lamp_grid.role") == "cell"]


def test_a_grid_lands_in_mlflow_and_a_second_run_skips_it(workdir, ray_local):
    spec = grid("three", [{"retriever": ["none", "BM25", "RanBM25"], "k": [2]}])
    rows = run_grid(spec, str(workdir / "data"), workdir, resources=Resources(zero_stage=2), log=lambda _: None)
    assert [r.status for r in rows] == ["FINISHED"] * 3
    client, all_runs = runs(workdir, "three")
    children = cells_of(all_runs)
    assert sorted(r.data.tags["cell_key"] for r in children) == sorted(r.cell.key for r in rows)
    (parent,) = [r for r in all_runs if r.data.tags.get("lamp_grid.role") == "grid"]
    assert parent.info.status == "FINISHED"
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["retriever"] in ("none", "BM25", "RanBM25")
        assert run.data.params["train.epochs"] == "1"
        assert {"train_loss", "select_f1", "dev_f1", "dev_accuracy"} <= set(run.data.metrics)
        assert 0 <= run.data.metrics["dev_f1"] <= 1
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert artifacts == {"predictions.json", "per_example_scores.json", "sample_prompts.json",
                             "deepspeed_config.json"}
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert len(history) == 1 and history[0].value > 0
    messages = []
    again = run_grid(spec, str(workdir / "data"), workdir, log=messages.append)
    assert "3 of 3 cell(s) already FINISHED" in " ".join(messages) and "running 0" in " ".join(messages)
    assert len(cells_of(runs(workdir, "three")[1])) == 3
    assert [r.status for r in again] == ["FINISHED"] * 3


def test_two_workers_with_zero_2(workdir, ray_local):
    spec = grid("two-workers", [{"retriever": ["BM25"], "k": [2], "order": ["end"]}])
    rows = run_grid(spec, str(workdir / "data"), workdir, resources=Resources(workers_per_trial=2, zero_stage=2),
                    log=lambda _: None)
    assert [r.status for r in rows] == ["FINISHED"]
    client, all_runs = runs(workdir, "two-workers")
    (cell,) = cells_of(all_runs)
    config = client.download_artifacts(cell.info.run_id, "deepspeed_config.json")
    assert '"stage": 2' in open(config).read()


def test_vote_needs_no_training(workdir, ray_local):
    spec = parse_grid({"name": "vote", "tasks": ["LaMP_2"], "model": "vote",
                       "axes": [{"retriever": ["BM25", "Full_Random"], "k": [5]}]}, "vote")
    rows = run_grid(spec, str(workdir / "data"), workdir, log=lambda _: None)
    metrics = {r.cell.cell.retriever: r.metrics["dev_accuracy"] for r in rows}
    assert metrics["BM25"] > metrics["Full_Random"]


def write_grid(path, name, axes):
    import yaml

    path.write_text(yaml.safe_dump({"name": name, "tasks": ["LaMP_2"], "model": "tiny", "axes": axes,
                                    "training": TRAINING}))
    return path


def test_a_crashed_trial_is_retried_into_its_one_run(workdir, tmp_path):
    spec = write_grid(tmp_path / "crash.yaml", "crash", [{"retriever": ["Random"], "k": [2]}])
    env = {**os.environ, "LAMP_GRID_CRASH_ONCE": str(tmp_path / "crashed")}
    done = run_cli("run", spec, "--data", workdir / "data", "--workdir", workdir, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(list((tmp_path / "crashed").iterdir())) == 1  # the first attempt did crash
    _, all_runs = runs(workdir, "crash")
    assert [r.info.status for r in cells_of(all_runs)] == ["FINISHED"]


def test_interrupt_then_resume_completes_the_grid(workdir, tmp_path):
    spec = write_grid(tmp_path / "stop.yaml", "stop", [{"retriever": ["BM25"], "k": [1, 2, 3]}])
    args = [sys.executable, str(ROOT / "experiments.py"), "run", str(spec), "--data", str(workdir / "data"),
            "--workdir", str(workdir), "--max-concurrent", "1"]
    # The store's tables first: this test's polling and the run creating them at once would collide.
    MlflowClient(Workdir(workdir).tracking_uri).search_experiments()
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # interrupt once the first cell is done
        time.sleep(2)
        try:
            _, all_runs = runs(workdir, "stop")
        except AttributeError:  # the experiment is not created yet
            continue
        if any(r.info.status == "FINISHED" for r in cells_of(all_runs)):
            break
    process.send_signal(signal.SIGINT)
    process.wait(timeout=300)
    _, all_runs = runs(workdir, "stop")
    statuses = [r.info.status for r in all_runs]
    assert "RUNNING" not in statuses and "SCHEDULED" not in statuses, statuses
    finished = [r for r in cells_of(all_runs) if r.info.status == "FINISHED"]
    assert 1 <= len(finished) < 3  # some cell done, the grid not

    done = run_cli("run", spec, "--data", workdir / "data", "--workdir", workdir, "--resume", timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, all_runs = runs(workdir, "stop")
    children = cells_of(all_runs)
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)
    assert len({r.data.tags["cell_key"] for r in children}) == 3


@pytest.mark.parametrize("args, message", [
    (["run", "no-such-grid"], "unknown grid"),
    (["run", "demo", "--model", "./no-such-model", "--dry-run"], None),
    (["run", "demo", "--tracking-uri", "http://127.0.0.1:9"], "cannot reach the MLflow tracking server"),
    (["run", "demo", "--address", "127.0.0.1:9"], "cannot reach Ray"),
])
def test_bad_input_is_refused_before_any_trial(args, message, tmp_path):
    done = run_cli(*args, "--workdir", tmp_path, timeout=120)
    if message is None:  # --dry-run runs nothing and needs no model
        assert done.returncode == 0 and "12 cell(s)" in done.stdout
        return
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


def test_data_missing_a_task_and_a_cell_too_big_for_the_cluster(workdir, tmp_path):
    done = run_cli("run", "demo", "--data", workdir / "data", "--workdir", tmp_path, timeout=120)
    assert done.returncode == 2 and "no LaMP_4" in done.stderr, done.stderr
    done = run_cli("run", "demo", "--gpus-per-worker", "1", "--workdir", tmp_path, timeout=120)
    assert done.returncode == 2 and "GPU" in done.stderr, done.stderr


def test_a_grid_whose_experiment_was_deleted_is_refused_with_the_way_out(tmp_path):
    client = MlflowClient(Workdir(tmp_path).tracking_uri)
    client.delete_experiment(client.create_experiment("demo"))  # as the MLflow UI's delete does
    done = run_cli("run", "demo", "--workdir", tmp_path, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "MLflow experiment 'demo' (id 1) is deleted" in done.stderr and "mlflow experiments restore" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()  # refused before any work
