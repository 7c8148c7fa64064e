"""What the MLflow UI shows comes from grid.tracking: the experiment's kind and
description, each cell's run (name, params, description, dataset inputs), system
metrics, and runs that a dead `run` left open, closed. A real sqlite store."""

import json
import subprocess
import sys
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

from grid import tracking
from grid.render import Rendered
from grid.spec import GridCell, Training
from lamp.cell import Cell


@pytest.fixture
def client(tmp_path):
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_the_experiment_opens_on_its_runs_and_says_what_it_is(client):
    experiment = tracking.experiment_id(client, "g", description="grid g: `python experiments.py run g`")
    tags = client.get_experiment(experiment).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["mlflow.note.content"] == "grid g: `python experiments.py run g`"
    # An existing experiment (made by an older lamp-grid) is given its kind too.
    older = client.create_experiment("older")
    assert tracking.experiment_id(client, "older") == older
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_cells_run_is_named_by_its_key_with_params_description_and_its_data(client, tmp_path):
    experiment = tracking.experiment_id(client, "g")
    parent = tracking.start_parent(client, experiment, "g", {})
    cell = GridCell(Cell("LaMP_2", "BM25", 4, "only_output", "end"), "tiny", Training())
    renders = {split: Rendered(str(tmp_path / f"render-{split}0123456789abcdef0123"), {"rows": rows})
               for split, rows in (("train", 90), ("dev", 12))}
    run = client.get_run(tracking.create_child(client, experiment, parent, cell, "fp", "g", renders, {}))
    assert run.info.run_name == cell.key and run.info.status == "SCHEDULED"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert {k: run.data.params[k] for k in ("task", "retriever", "k", "ablation", "order", "rank_offset", "recipe",
                                            "model", "seed")} == {
        "task": "LaMP_2", "retriever": "BM25", "k": "4", "ablation": "only_output", "order": "end",
        "rank_offset": "0", "recipe": "lamp", "model": "tiny", "seed": "0"}
    assert run.data.tags["mlflow.note.content"] == (
        "LaMP_2, recipe lamp, model tiny, seed 0: k=4 profile item(s) by BM25; output halves shown; "
        "most relevant last, next to the task input.")
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "dev"}
    assert inputs["train"].name == "LaMP_2-train" and inputs["train"].digest == "train0123456789abcdef0123"
    assert json.loads(inputs["dev"].profile) == {"num_rows": 12}
    assert json.loads(inputs["dev"].source)["uri"].endswith("render-dev0123456789abcdef0123/rendered.parquet")


def test_system_metrics_are_logged_even_for_a_run_shorter_than_one_interval(client):
    experiment = tracking.experiment_id(client, "g")
    run = client.create_run(experiment).info.run_id
    with tracking.system_metrics(client.tracking_uri, run):
        sum(i * i for i in range(10 ** 6))
    metrics = client.get_run(run).data.metrics
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
    assert metrics["system/system_memory_usage_megabytes"] > 0


def gone_process() -> tuple:
    """A process that has ended (its pid and start time, as a dead `run` left them)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    process = psutil.Process(child.pid)
    started = process.create_time()
    child.wait()
    return process.pid, started


def invocation(client, experiment, host, pid, started, heartbeat) -> tuple:
    """A parent run RUNNING as a `run` on `host` left it, with a RUNNING and a SCHEDULED child."""
    from mlflow.entities import RunTag

    parent = tracking.start_parent(client, experiment, "g", {})
    client.log_batch(parent, tags=[RunTag("lamp_grid.host", host), RunTag("lamp_grid.pid", str(pid)),
                                   RunTag("lamp_grid.process_started", str(started)),
                                   RunTag("lamp_grid.heartbeat", str(heartbeat))])
    children = []
    for status in ("RUNNING", "SCHEDULED"):
        child = client.create_run(experiment, tags={"mlflow.parentRunId": parent, "lamp_grid.role": "cell"})
        client.update_run(child.info.run_id, status=status)
        children.append(child.info.run_id)
    return parent, children


def test_runs_left_open_by_a_dead_run_are_killed_and_a_live_ones_are_not(client):
    import socket

    experiment = tracking.experiment_id(client, "g")
    here, me = socket.gethostname(), psutil.Process()
    dead_here = invocation(client, experiment, here, *gone_process(), time.time())
    # The same pid, started at another time: the pid was reused by another process.
    reused = invocation(client, experiment, here, me.pid, me.create_time() - 100, time.time())
    stale_elsewhere = invocation(client, experiment, "another-host", 1, 0, time.time() - tracking.STALE_S - 5)
    alive_here = invocation(client, experiment, here, me.pid, me.create_time(), time.time() - 1000)
    alive_elsewhere = invocation(client, experiment, "another-host", 1, 0, time.time())
    finished = client.create_run(experiment, tags={"lamp_grid.role": "cell"}).info.run_id
    client.set_terminated(finished)

    said = []
    tracking.close_dead_runs(client, experiment, said.append)

    def status(run):
        return client.get_run(run).info.status

    for parent, children in (dead_here, reused, stale_elsewhere):
        assert [status(r) for r in (parent, *children)] == ["KILLED"] * 3
    assert [status(r) for r in (alive_here[0], *alive_here[1])] == ["RUNNING", "RUNNING", "SCHEDULED"]
    assert [status(r) for r in (alive_elsewhere[0], *alive_elsewhere[1])] == ["RUNNING", "RUNNING", "SCHEDULED"]
    assert status(finished) == "FINISHED"
    (line,) = said
    assert line.startswith("marked 9 run(s) KILLED")
    for parent, _ in (dead_here, reused, stale_elsewhere):
        assert parent[:8] in line
    said.clear()
    tracking.close_dead_runs(client, experiment, said.append)
    assert said == []


def test_a_live_run_keeps_its_heartbeat_fresh(client, monkeypatch):
    monkeypatch.setattr(tracking, "HEARTBEAT_S", 0.2)
    experiment = tracking.experiment_id(client, "g")
    parent = tracking.start_parent(client, experiment, "g", {})
    with tracking.heartbeat(client, parent):
        first = float(client.get_run(parent).data.tags["lamp_grid.heartbeat"])
        time.sleep(1)
        assert float(client.get_run(parent).data.tags["lamp_grid.heartbeat"]) > first
        assert tracking.invocation_alive(client.get_run(parent))
    tags = client.get_run(parent).data.tags
    assert tags["lamp_grid.pid"] == str(psutil.Process().pid)
