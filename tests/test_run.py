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


@pytest.fixture(scope="module")
def three(workdir, ray_local):
    """A three-cell grid, run once: (its spec, the CellResults, what `run` logged)."""
    spec = grid("three", [{"retriever": ["none", "BM25", "RanBM25"], "k": [2]}])
    logged = []
    rows = run_grid(spec, str(workdir / "data"), workdir, resources=Resources(zero_stage=2), log=logged.append,
                    command="python experiments.py run three.yaml")
    return spec, rows, logged


@pytest.mark.slow
def test_a_grid_lands_in_mlflow_and_a_second_run_skips_it(workdir, three):
    spec, rows, first = three
    assert [r.status for r in rows] == ["FINISHED"] * 3
    assert "render: 3 cell(s) rendered, 0 cached" in first
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
                             "deepspeed_config.json", "train_order"}
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert len(history) == 1 and history[0].value > 0
    messages = []
    again = run_grid(spec, str(workdir / "data"), workdir, log=messages.append)
    assert "3 of 3 cell(s) already FINISHED" in " ".join(messages) and "running 0" in " ".join(messages)
    assert len(cells_of(runs(workdir, "three")[1])) == 3
    assert [r.status for r in again] == ["FINISHED"] * 3


@pytest.mark.slow
def test_every_cell_run_records_how_to_run_it_again(workdir, three):
    from grid.environment import code_state

    _, rows, _ = three
    client = MlflowClient(Workdir(workdir).tracking_uri)
    tags = client.get_run(rows[1].run_id).data.tags
    assert tags["lamp_grid.command"] == "python experiments.py run three.yaml"
    assert tags["lamp_grid.data"] == str((workdir / "data").resolve()) and tags["lamp_grid.tasks"] == "LaMP_2"
    assert json.loads(tags["lamp_grid.resources"])["zero_stage"] == 2
    assert {k: tags[k] for k in ("git_commit", "lamp_grid.code_diff")} == code_state()
    assert len(tags["lamp_grid.render.train"]) == len(tags["lamp_grid.render.dev"]) == 24
    # From the worker that trained it: versions, hardware, threads, CPU kernels, the lock.
    assert tags["env.torch"].startswith("2.13.0") and tags["env.transformers"] and tags["env.pyarrow"]
    assert tags["env.cpu"] and tags["env.gpu"] == "none" and tags["env.torch_threads"] == "1"
    assert tags["env.cpu_kernels"] == "MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2"
    assert tags["env.lock"] == "the lock's"


def train_order(client, run_id: str, epochs: int) -> list:
    """The ids each optimizer step trained on, per epoch, as the run logged them."""
    return [json.load(open(client.download_artifacts(run_id, f"train_order/epoch-{epoch}.json")))["batches"]
            for epoch in range(epochs)]


@pytest.mark.slow
def test_one_two_and_three_workers_train_on_the_same_global_batches(workdir, ray_local, tmp_path):
    from grid.order import TrainRows, global_batches

    spec = grid("workers", [{"retriever": ["BM25"], "k": [2]}], epochs=2, batch_size=6)
    seen = {}
    for workers in (1, 2, 3):
        uri = f"sqlite:///{tmp_path / f'{workers}.db'}"
        (row,) = run_grid(spec, str(workdir / "data"), workdir, tracking_uri=uri,
                          resources=Resources(workers_per_trial=workers), log=lambda _: None)
        client = MlflowClient(uri)
        seen[workers] = (train_order(client, row.run_id, 2), client.get_run(row.run_id).data.metrics)
    orders = [order for order, _ in seen.values()]
    assert orders[0] == orders[1] == orders[2]
    # ... and they are the constructed order of the rendered train rows.
    rendered = client.get_run(row.run_id).data.tags["lamp_grid.render.train"]
    (path,) = (workdir / "cache").rglob(f"render-{rendered}/rendered.parquet")
    table = pq.read_table(path).filter(pc.field("selection") >= 0.1)  # train, less the users held out
    rows = TrainRows([table])
    assert orders[0] == [[[rows.ids[i] for i in batch] for batch in global_batches(rows.lengths, 6, 0, epoch)]
                         for epoch in range(2)]
    # The same sums, split over other workers, differ only in rounding.
    one = seen[1][1]
    for workers in (2, 3):
        metrics = seen[workers][1]
        assert metrics["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
        assert metrics["select_f1"] == pytest.approx(one["select_f1"], abs=0.02)
        assert metrics["dev_f1"] == pytest.approx(one["dev_f1"], abs=0.02)


@pytest.mark.slow
def test_a_trial_killed_mid_epoch_and_retried_ends_as_if_never_killed(workdir, tmp_path):
    """Dropout on, so the retry must also restore the random state the checkpoint kept."""
    from grid.tiny import build_tiny_model

    model = build_tiny_model(workdir / "data", ["LaMP_2"], tmp_path / "tiny")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "dropout_rate": 0.1}))
    spec = tmp_path / "killed.yaml"
    import yaml

    spec.write_text(yaml.safe_dump({"name": "mid-epoch", "tasks": ["LaMP_2"], "model": str(model),
                                    "axes": [{"retriever": ["BM25"], "k": [2]}],
                                    "training": {**TRAINING, "epochs": 3}}))
    seen = {}
    for name, env in (("whole", {}), ("killed", {"LAMP_GRID_CRASH_ONCE": str(tmp_path / "crashed"),
                                                 "LAMP_GRID_CRASH_AT": "1:2"})):
        uri = f"sqlite:///{tmp_path / f'{name}.db'}"
        done = run_cli("run", spec, "--data", workdir / "data", "--workdir", workdir, "--tracking-uri", uri,
                       env={**os.environ, **env}, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        client = MlflowClient(uri)
        (run,) = cells_of(client.search_runs([client.get_experiment_by_name("mid-epoch").experiment_id]))
        seen[name] = {"metrics": {k: v for k, v in run.data.metrics.items() if k.startswith(("dev_", "select_"))},
                      "losses": [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")],
                      "predictions": open(client.download_artifacts(run.info.run_id, "predictions.json")).read(),
                      "order": train_order(client, run.info.run_id, 3)}
    assert len(list((tmp_path / "crashed").iterdir())) == 1  # the first attempt did die, in epoch 1
    assert seen["killed"] == seen["whole"]


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


@pytest.mark.slow
def test_a_crashed_trial_is_retried_into_its_one_run(workdir, tmp_path):
    spec = write_grid(tmp_path / "crash.yaml", "crash", [{"retriever": ["Random"], "k": [2]}])
    env = {**os.environ, "LAMP_GRID_CRASH_ONCE": str(tmp_path / "crashed")}
    before = set((workdir / "cache").rglob("render-*"))
    done = run_cli("run", spec, "--data", workdir / "data", "--workdir", workdir, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(list((tmp_path / "crashed").iterdir())) == 1  # the first attempt did crash
    _, all_runs = runs(workdir, "crash")
    (run,) = cells_of(all_runs)
    assert run.info.status == "FINISHED"
    # Rendered once, before any trial: the retry read the same train and dev renders.
    assert [line for line in done.stdout.splitlines() if line.startswith("render:")] == \
        ["render: 1 cell(s) rendered, 0 cached"]
    renders = set((workdir / "cache").rglob("render-*")) - before
    assert len(renders) == 2 and all(p.stat().st_mtime * 1000 < run.info.start_time for p in renders)


@pytest.mark.slow
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


def test_a_dry_run_prints_each_cells_gpu_memory(tmp_path):
    # flan-t5-base's config.json as the hub has it: the estimate reads no weights.
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "d_model": 768, "d_ff": 2048, "d_kv": 64,
        "num_layers": 12, "num_decoder_layers": 12, "num_heads": 12, "vocab_size": 32128,
        "feed_forward_proj": "gated-gelu", "is_encoder_decoder": True, "tie_word_embeddings": False,
        "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}))
    common = ["--model", tmp_path / "model", "--dry-run", "--gpus-per-worker", "1", "--workdir", tmp_path]
    trained = run_cli("run", "paper-fig-b", *common, timeout=120)
    assert trained.returncode == 0, trained.stderr
    # 247.6M parameters (its LM head apart) x 12 bytes of AdamW state in bf16 training
    assert "DeepSpeed ZeRO-2; GPU memory about" in trained.stdout and "optimizer 3.0," in trained.stdout, trained.stdout
    zero_shot = run_cli("run", "paper-zero-shot", *common, timeout=120)
    assert zero_shot.returncode == 0, zero_shot.stderr
    line = zero_shot.stdout.splitlines()[1]
    assert "zero-shot, no optimizer" in line and "weights 0.5, gradients 0.0, optimizer 0.0" in line, line


def test_two_workers_on_fractions_of_gpus_are_refused_before_any_work(tmp_path):
    done = run_cli("run", "demo", "--workers-per-trial", "2", "--gpus-per-worker", "0.5", "--workdir", tmp_path,
                   timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--gpus-per-worker 0.5 with 2 workers per trial" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_batch_that_the_workers_cannot_share_is_refused_before_any_work(tmp_path):
    done = run_cli("run", "demo", "--workers-per-trial", "3", "--workdir", tmp_path, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "batch_size 16 cannot be split evenly over 3 workers" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.slow  # tens of seconds waiting on other processes: out of the quick loop
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


@pytest.mark.slow
def test_a_run_killed_with_sigkill_leaves_nothing_open_after_the_next_run(workdir, tmp_path):
    spec = write_grid(tmp_path / "killed.yaml", "killed", [{"retriever": ["BM25"], "k": [1, 2, 3]}])
    args = [sys.executable, str(ROOT / "experiments.py"), "run", str(spec), "--data", str(workdir / "data"),
            "--workdir", str(workdir), "--max-concurrent", "1"]
    MlflowClient(Workdir(workdir).tracking_uri).search_experiments()  # the store's tables first, as above
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill the driver once a cell is done and the next one runs
        time.sleep(1)
        try:
            _, all_runs = runs(workdir, "killed")
        except AttributeError:
            continue
        statuses = [r.info.status for r in cells_of(all_runs)]
        if "FINISHED" in statuses and "RUNNING" in statuses:
            break
    process.kill()
    process.wait(timeout=60)
    _, all_runs = runs(workdir, "killed")
    assert "RUNNING" in [r.info.status for r in all_runs]  # what a driver killed this way leaves

    done = run_cli("run", spec, "--data", workdir / "data", "--workdir", workdir, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "run(s) KILLED that an earlier `run` left open" in done.stdout
    _, all_runs = runs(workdir, "killed")
    statuses = [r.info.status for r in all_runs]
    assert "RUNNING" not in statuses and "SCHEDULED" not in statuses, statuses
    finished = [r.data.tags["cell_key"] for r in cells_of(all_runs) if r.info.status == "FINISHED"]
    assert sorted(finished) == sorted(set(finished)) and len(finished) == 3


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
        done = run_cli("rerun", run_id, "--workdir", tmp_path, timeout=120)
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
