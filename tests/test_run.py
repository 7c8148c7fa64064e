"""`run` on real local Ray with the tiny model: Tune trials that fine-tune with
Ray Train + DeepSpeed ZeRO on CPU, tracked in a real MLflow store."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from grid.run import Workdir, run_grid
from grid.spec import Resources, parse_grid
from lamp.synth import write_synthetic
from tests.cli import ROOT, call_cli, run_cli

TRAINING = {"epochs": 1, "lr": 1e-3, "batch_size": 8, "beams": 1}
pytestmark = pytest.mark.waiting  # one trial at a time: before the other tests (tests/conftest.py)


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


def train_order(client, run_id: str, epochs: int) -> list:
    """The ids each optimizer step trained on, per epoch, as the run logged them."""
    return [json.load(open(client.download_artifacts(run_id, f"train_order/epoch-{epoch}.json")))["batches"]
            for epoch in range(epochs)]


@pytest.mark.slow
def test_one_and_three_workers_train_on_the_same_global_batches(workdir, ray_local, tmp_path):
    from grid.order import TrainRows, global_batches

    spec = grid("workers", [{"retriever": ["BM25"], "k": [2]}], epochs=2, batch_size=6)
    seen = {}
    for workers in (1, 3):  # three: an odd count, each dealt a third of every global batch of 6
        uri = f"sqlite:///{tmp_path / f'{workers}.db'}"
        (row,) = run_grid(spec, str(workdir / "data"), workdir, tracking_uri=uri,
                          resources=Resources(workers_per_trial=workers), log=lambda _: None)
        client = MlflowClient(uri)
        seen[workers] = (train_order(client, row.run_id, 2), client.get_run(row.run_id).data.metrics)
    orders = [order for order, _ in seen.values()]
    assert orders[0] == orders[1]
    # ... and they are the constructed order of the rendered train rows.
    rendered = client.get_run(row.run_id).data.tags["lamp_grid.render.train"]
    (path,) = (workdir / "cache").rglob(f"render-{rendered}/rendered.parquet")
    table = pq.read_table(path).filter(pc.field("selection") >= 0.1)  # train, less the users held out
    rows = TrainRows([table])
    assert orders[0] == [[[rows.ids[i] for i in batch] for batch in global_batches(rows.lengths, 6, 0, epoch)]
                         for epoch in range(2)]
    # The same sums, split over other workers, differ only in rounding.
    one = seen[1][1]
    metrics = seen[3][1]
    assert metrics["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
    assert metrics["select_f1"] == pytest.approx(one["select_f1"], abs=0.02)
    assert metrics["dev_f1"] == pytest.approx(one["dev_f1"], abs=0.02)


@pytest.mark.slow
def test_a_trial_killed_mid_epoch_and_retried_ends_as_its_rerun_does(workdir, ray_local, tmp_path):
    """A cell crashed in epoch 1 and retried, then run again with `rerun`: the same
    losses, train order, dev metrics and predictions. Dropout on, so the retry must
    also restore the random state the checkpoint kept."""
    import yaml

    from grid import tracking
    from grid.rerun import rerun
    from grid.tiny import build_tiny_model

    model = build_tiny_model(workdir / "data", ["LaMP_2"], tmp_path / "tiny")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "dropout_rate": 0.1}))
    spec = tmp_path / "killed.yaml"
    spec.write_text(yaml.safe_dump({"name": "mid-epoch", "tasks": ["LaMP_2"], "model": str(model),
                                    "axes": [{"retriever": ["BM25"], "k": [2]}],
                                    "training": {**TRAINING, "epochs": 2}}))
    uri, renders = f"sqlite:///{tmp_path / 'mlflow.db'}", set((workdir / "cache").rglob("render-*"))
    crash = {"LAMP_GRID_CRASH_ONCE": str(tmp_path / "crashed"), "LAMP_GRID_CRASH_AT": "1:2"}
    done = run_cli("run", spec, "--data", workdir / "data", "--workdir", workdir, "--tracking-uri", uri,
                   env={**os.environ, **crash}, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(list((tmp_path / "crashed").iterdir())) == 1  # the first attempt did die, in epoch 1
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("mid-epoch").experiment_id
    (killed,) = cells_of(client.search_runs([experiment]))
    assert killed.info.status == "FINISHED"  # the retry went on in the one run of the cell
    # Rendered once, before any trial: the retry read the same train and dev renders.
    assert [line for line in done.stdout.splitlines() if line.startswith("render:")] == \
        ["render: 1 cell(s) rendered, 0 cached"]
    renders = set((workdir / "cache").rglob("render-*")) - renders
    assert len(renders) == 2 and all(p.stat().st_mtime * 1000 < killed.info.start_time for p in renders)

    said = []
    assert rerun(killed.info.run_id, uri, workdir, log=said.append) == 0  # here, where nothing crashes
    said = "\n".join(said)
    assert "render: 0 cell(s) rendered, 1 cached" in said
    assert "identical: the same dev metrics and predictions as the recorded run" in said
    assert "the environment is the recorded one" in said
    (parent,) = client.search_runs([experiment], "tags.`lamp_grid.role` = 'rerun'")
    assert parent.info.run_name == f"rerun of {killed.info.run_id}" and parent.info.status == "FINISHED"
    (again,) = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert again.data.tags["cell_key"] == killed.data.tags["cell_key"] and again.info.status == "FINISHED"
    # A rerun is not one of the grid's results.
    assert [r.info.run_id for r in tracking.cell_runs(client, experiment)[killed.data.tags["cell_key"]]] == \
        [killed.info.run_id]
    for name in ("train_loss", "select_f1"):
        assert [m.value for m in client.get_metric_history(killed.info.run_id, name)] == \
            [m.value for m in client.get_metric_history(again.info.run_id, name)], name
    assert train_order(client, killed.info.run_id, 2) == train_order(client, again.info.run_id, 2)


@pytest.mark.slow
def test_zero_shot_trains_nothing_and_keeps_no_checkpoint(workdir, ray_local, tmp_path):
    spec = grid("zero-shot", [{"retriever": ["BM25"], "k": [2]}], epochs=0)
    storage = tmp_path / "ray_results"
    rows = run_grid(spec, str(workdir / "data"), workdir, storage=str(storage), log=lambda _: None)
    assert [r.status for r in rows] == ["FINISHED"]
    client, all_runs = runs(workdir, "zero-shot")
    (cell,) = cells_of(all_runs)
    assert {"dev_f1", "dev_accuracy", "n_params", "decode_examples_per_s"} <= set(cell.data.metrics)
    assert not {"train_loss", "train_s", "checkpoint_s"} & set(cell.data.metrics)
    # No DeepSpeed engine was built: no config logged, and no training state or best weights stored.
    config = client.download_artifacts(cell.info.run_id, "deepspeed_config.json")
    assert open(config).read() == "{}"
    assert not [p for p in storage.rglob("*") if p.name.startswith(("checkpoint", "epoch-"))]


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


def start_grid(spec, workdir, *extra) -> subprocess.Popen:
    """`run` of a grid in a process of its own, one cell at a time, for a test to stop."""
    args = [sys.executable, str(ROOT / "experiments.py"), "run", str(spec), "--data", str(workdir / "data"),
            "--workdir", str(workdir), "--max-concurrent", "1", *extra]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for_cells(workdir, experiment: str, ready) -> list:
    """Polls the store until `ready(statuses of the cell runs)`; returns those statuses."""
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(1)
        try:
            _, all_runs = runs(workdir, experiment)
        except AttributeError:  # the experiment is not created yet
            continue
        statuses = [r.info.status for r in cells_of(all_runs)]
        if ready(statuses):
            return statuses
    pytest.fail(f"no cell of {experiment} reached the state waited for in 300 s")


@pytest.mark.slow
def test_a_grid_interrupted_then_killed_then_run_again_completes_with_one_run_per_cell(workdir, tmp_path):
    spec = write_grid(tmp_path / "stop.yaml", "stop", [{"retriever": ["BM25"], "k": [1, 2, 3]}])
    # The store's tables first: this test's polling and the run creating them at once would collide.
    MlflowClient(Workdir(workdir).tracking_uri).search_experiments()

    # Ctrl-C once a cell is done: every run it opened is closed.
    process = start_grid(spec, workdir)
    wait_for_cells(workdir, "stop", lambda statuses: "FINISHED" in statuses)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=300)
    _, all_runs = runs(workdir, "stop")
    statuses = [r.info.status for r in all_runs]
    assert "RUNNING" not in statuses and "SCHEDULED" not in statuses, statuses
    finished = [r for r in cells_of(all_runs) if r.info.status == "FINISHED"]
    assert 1 <= len(finished) < 3  # some cell done, the grid not

    # Resumed, then SIGKILLed while a cell trains: the driver cannot close what it opened.
    process = start_grid(spec, workdir, "--resume")
    wait_for_cells(workdir, "stop", lambda statuses: "RUNNING" in statuses)
    process.kill()
    process.wait(timeout=60)
    _, all_runs = runs(workdir, "stop")
    assert "RUNNING" in [r.info.status for r in all_runs]

    # The next run closes those as KILLED and finishes the grid: one FINISHED run per cell.
    done = run_cli("run", spec, "--data", workdir / "data", "--workdir", workdir, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "run(s) KILLED that an earlier `run` left open" in done.stdout
    _, all_runs = runs(workdir, "stop")
    statuses = [r.info.status for r in all_runs]
    assert "RUNNING" not in statuses and "SCHEDULED" not in statuses, statuses
    finished = [r.data.tags["cell_key"] for r in cells_of(all_runs) if r.info.status == "FINISHED"]
    assert sorted(finished) == sorted(set(finished)) and len(finished) == 3


@pytest.mark.parametrize("args, message", [
    (["run", "no-such-grid"], "unknown grid"),
    (["run", "demo", "--model", "./no-such-model", "--dry-run"], None),
    (["run", "demo", "--tracking-uri", "http://127.0.0.1:9"], "cannot reach the MLflow tracking server"),
    (["run", "demo", "--address", "127.0.0.1:9"], "cannot reach Ray"),
])
def test_bad_input_is_refused_before_any_trial(args, message, tmp_path):
    if "--address" in args:  # in a process of its own: this one may have joined a cluster already (ray_local)
        done = run_cli(*args, "--workdir", tmp_path, timeout=120)
    else:
        done = call_cli(*args, "--workdir", tmp_path)
    if message is None:  # --dry-run runs nothing and needs no model
        assert done.returncode == 0 and "12 cell(s)" in done.stdout
        return
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


def test_a_dry_run_prints_each_cells_gpu_memory(tmp_path):
    # flan-t5-base's config.json as the hub has it: the estimate reads no weights.
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "d_model": 768, "d_ff": 2048, "d_kv": 64,
        "num_layers": 12, "num_decoder_layers": 12, "num_heads": 12, "vocab_size": 32128,
        "feed_forward_proj": "gated-gelu", "is_encoder_decoder": True, "tie_word_embeddings": False,
        "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}))
    common = ["--model", tmp_path / "model", "--dry-run", "--gpus-per-worker", "1", "--workdir", tmp_path]
    trained = call_cli("run", "paper-fig-b", *common)
    assert trained.returncode == 0, trained.stderr
    # 247.6M parameters (its LM head apart) x 12 bytes of AdamW state in bf16 training
    assert "DeepSpeed ZeRO-2; GPU memory about" in trained.stdout and "optimizer 3.0," in trained.stdout, trained.stdout
    zero_shot = call_cli("run", "paper-zero-shot", *common)
    assert zero_shot.returncode == 0, zero_shot.stderr
    line = zero_shot.stdout.splitlines()[1]
    assert "zero-shot, no optimizer" in line and "weights 0.5, gradients 0.0, optimizer 0.0" in line, line


def test_two_workers_on_fractions_of_gpus_are_refused_before_any_work(tmp_path):
    done = call_cli("run", "demo", "--workers-per-trial", "2", "--gpus-per-worker", "0.5", "--workdir", tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--gpus-per-worker 0.5 with 2 workers per trial" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_batch_that_the_workers_cannot_share_is_refused_before_any_work(tmp_path):
    done = call_cli("run", "demo", "--workers-per-trial", "3", "--workdir", tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "batch_size 16 cannot be split evenly over 3 workers" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()


def test_data_missing_a_task_and_a_cell_too_big_for_the_cluster(workdir, ray_local, tmp_path):
    done = call_cli("run", "demo", "--data", workdir / "data", "--workdir", tmp_path)
    assert done.returncode == 2 and "no LaMP_4" in done.stderr, done.stderr
    done = call_cli("run", "demo", "--gpus-per-worker", "1", "--workdir", tmp_path)
    assert done.returncode == 2 and "GPU" in done.stderr, done.stderr


def test_a_grid_whose_experiment_was_deleted_is_refused_with_the_way_out(tmp_path):
    client = MlflowClient(Workdir(tmp_path).tracking_uri)
    client.delete_experiment(client.create_experiment("demo"))  # as the MLflow UI's delete does
    done = call_cli("run", "demo", "--workdir", tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "MLflow experiment 'demo' (id 1) is deleted" in done.stderr and "mlflow experiments restore" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()  # refused before any work


def test_a_trial_that_a_startable_node_type_fits_waits_for_the_autoscaler(ray_local, tmp_path, monkeypatch):
    """On an autoscaling cluster with no GPU node up (min_workers: 0), a GPU trial is
    not refused: the autoscaler's config, which `ray up` leaves on the head as
    ~/ray_bootstrap_config.yaml, has a node type for it; its GPU memory comes from
    its instance type."""
    import yaml

    from grid.cluster import check_fits, gpu_memory, trials_that_fit
    from lamp.errors import LampError

    monkeypatch.setenv("HOME", str(tmp_path))
    gpu = Resources(gpus_per_worker=1)
    with pytest.raises(LampError, match="no node type its autoscaler can start"):
        check_fits(gpu, print)
    config = {"max_workers": 8, "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 8}, "node_config": {"InstanceType": "m5.2xlarge"}},
        "gpu_worker": {"min_workers": 0, "max_workers": 4, "resources": {"CPU": 4, "GPU": 1, "memory": 1e10},
                       "node_config": {"InstanceType": "g5.xlarge"}}}}
    (tmp_path / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(config))
    messages = []
    check_fits(gpu, messages.append)
    assert "trials wait for the autoscaler to start a node with 4 CPU, 1 GPU" in messages[0]
    assert trials_that_fit(gpu) == 4  # one per GPU node the autoscaler may start
    with pytest.raises(LampError, match="2 GPU"):
        check_fits(Resources(gpus_per_worker=2), print)
    assert gpu_memory(messages.append) == 24 * 2 ** 30  # g5: an A10G
    config["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"] = "x9.gpu"
    (tmp_path / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(config))
    assert gpu_memory(messages.append) is None
    assert "the GPU memory of instance type(s) x9.gpu is not known here" in messages[-1]


def test_rerun_refuses_a_run_it_cannot_rerun_in_one_line_and_writes_nothing(tmp_path):
    client = MlflowClient(Workdir(tmp_path).tracking_uri)
    experiment = client.create_experiment("g")
    record = {"lamp_grid.role": "cell", "lamp_grid.data": str(tmp_path), "lamp_grid.tasks": "LaMP_2",
              "lamp_grid.resources": "{}"}
    grid_run = client.create_run(experiment, run_name="g grid", tags={"lamp_grid.role": "grid"}).info.run_id
    elsewhere = client.create_run(experiment, tags={**record, "git_commit": "0" * 40}).info.run_id
    unrecorded = client.create_run(experiment, tags={"lamp_grid.role": "cell"}).info.run_id

    def everything():
        return [(r.info.run_id, r.info.status, r.data.tags, r.data.metrics) for r in client.search_runs([experiment])]

    before = everything()
    for run_id, message in (("0123abc", "no run '0123abc' in sqlite:///"),
                            (grid_run, f"run {grid_run} is not a lamp-grid cell"),
                            (elsewhere, f"was made at commit {'0' * 40}, which is not in this repository"),
                            (unrecorded, "does not record lamp_grid.data, lamp_grid.tasks, lamp_grid.resources, "
                                         "git_commit")):
        done = call_cli("rerun", run_id, "--workdir", tmp_path)
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr.startswith("lamp-grid rerun: error: ") and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert everything() == before
    assert [e.name for e in client.search_experiments()] == ["g", "Default"]


def test_a_rerun_that_differs_says_by_how_much_and_what_in_the_environment_differs(tmp_path):
    from grid.rerun import comparison

    client = MlflowClient(Workdir(tmp_path).tracking_uri)
    experiment = client.create_experiment("g")

    def cell_run(f1: float, transformers: str):
        run_id = client.create_run(experiment, tags={"cell_key": "LaMP_2/lamp/none/seed=0/tiny", "git_commit": "abc",
                                                     "env.transformers": transformers}).info.run_id
        client.log_metric(run_id, "dev_f1", f1)
        client.log_metric(run_id, "dev_accuracy", 0.5)
        return client.get_run(run_id)

    old, new = cell_run(0.25, "5.24.0"), cell_run(0.2, "5.25.0")
    lines = comparison(old, new, {"q1": ("comedy", "comedy"), "q2": ("action", "comedy")},
                       {"q1": ("comedy", "comedy"), "q2": ("action", "action")})
    assert lines[0] == (f"rerun of {old.info.run_id} (LaMP_2/lamp/none/seed=0/tiny): new run {new.info.run_id}, "
                        f'under the parent "rerun of {old.info.run_id}"')
    assert lines[2:] == ["  dev_accuracy     0.5000     0.5000  identical",
                         "  dev_f1           0.2500     0.2000  -0.05",
                         "  predictions: 1 of 2 identical",
                         "differs: dev_f1 by -0.05; 1 prediction(s)",
                         "the environment differs from the recorded one:",
                         "  transformers: 5.24.0 -> 5.25.0"]
