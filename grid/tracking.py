"""MLflow tracking: one experiment per grid, a parent run per `run`, a child run per cell.

Child runs are created by the driver before any trial starts, so a trial and
all its retries log into the one run the driver made for its cell. A run that
waits is SCHEDULED; the trial marks it RUNNING, then FINISHED or FAILED; when
`run` exits (Ctrl-C included) nothing is left SCHEDULED or RUNNING. A driver
that dies without a word (kill -9, a lost head) cannot close its runs: its
parent run carries its host, process and a heartbeat, and the next `run` marks
what a dead invocation left open KILLED before it starts.
"""

import json
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from grid.environment import recorded
from grid.spec import GridCell, varying_axes
from grid.trial.weights import portable_config
from lamp.errors import LampError
from lamp.tasks import get_task

VERSION = "0.1.0"
OPEN = ("SCHEDULED", "RUNNING")
# MLflow 3 shows an experiment by its kind: model development is runs, not GenAI traces.
EXPERIMENT_KIND = "custom_model_development"
NOTE = "mlflow.note.content"  # a run's or an experiment's description in the UI (Markdown)
HEARTBEAT_S = 30  # how often a `run` says it is alive on its parent run
STALE_S = 4 * HEARTBEAT_S  # silent this long, a `run` on another host is taken for dead
VIEW = "lamp-grid-cells"  # the shared view of a grid's runs table (share_cells_view)
SYSTEM_METRICS_S = 5  # sampling interval of CPU, memory and GPU use: a demo cell lasts seconds


def connect(uri: str):
    """A client for the tracking store, checked to answer."""
    from mlflow.tracking import MlflowClient

    if uri.startswith(("http://", "https://")):
        check_server(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as error:  # any failure to answer is the same to a user: unreachable
        raise LampError(f"cannot reach the MLflow tracking store at {uri}: "
                        f"{' '.join(str(error).split())[:200]}") from None
    return client


def check_server(uri: str, timeout: float = 5) -> None:
    """An MLflow server answers /health; MLflow's own client retries for minutes first."""
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except OSError as error:
        raise LampError(f"cannot reach the MLflow tracking server at {uri}: {error}") from None


def find_experiment(client, name: str):
    """The MLflow experiment of that name, or None; a deleted one is refused
    (MLflow keeps its name, and its runs, until `mlflow gc`)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise LampError(f"MLflow experiment {name!r} (id {experiment.experiment_id}) is deleted; restore it "
                        f"with `mlflow experiments restore --experiment-id {experiment.experiment_id}` or "
                        f"remove it for good with `mlflow gc` before using grid {name!r} again")
    return experiment


def experiment_id(client, name: str, artifact_location: str | None = None, description: str = "") -> str:
    """The grid's experiment, created (before any trial starts) if it is new, with
    the kind that opens it on its runs table and, given one, its description."""
    experiment = find_experiment(client, name)
    if experiment is None:
        found = client.create_experiment(name, artifact_location=artifact_location)
    else:
        found = experiment.experiment_id
    client.set_experiment_tag(found, "mlflow.experimentKind", EXPERIMENT_KIND)
    if description:
        client.set_experiment_tag(found, NOTE, description)
    return found


def share_cells_view(client, experiment: str, cells: list) -> None:
    """The experiment's runs table as a shared MLflow view (cells_view opens it): the
    axes that vary and each task's main dev metric as columns, and the data each run
    saw. MLflow keeps a view's columns in the browser alone, and shows no param or
    metric until asked; a shared view is kept in the experiment, for every reader."""
    params = list(varying_axes(cells)) or ["task"]
    metrics = dict.fromkeys(f"dev_{get_task(c.cell.task).main_metric}" for c in cells)
    columns = ([f"params.`{p}`" for p in params] + [f"metrics.`{m}`" for m in metrics]
               + ["attributes.`Dataset`", "attributes.`Duration`"])
    client.set_experiment_tag(experiment, f"mlflow.sharedViewState.{VIEW}", json.dumps(
        {"selectedColumns": columns, "orderByKey": "attributes.start_time", "orderByAsc": False}))


def cells_view(ui: str, experiment: str) -> str:
    """Where the MLflow UI at `ui` shows the grid's cells side by side. The workflow
    is named: MLflow 3's UI otherwise starts a new browser on its GenAI pages."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment}/runs?viewStateShareKey={VIEW}&workflowType=machine_learning"


def search(client, experiment: str, where: str):
    """Every run of the experiment that matches `where`, newest first, page by page."""
    token = None
    while True:
        page = client.search_runs([experiment], where, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time DESC"])
        yield from page
        token = page.token
        if not token:
            return


def cell_runs(client, experiment: str) -> dict:
    """cell key -> the experiment's runs of that cell, newest first. A `rerun`'s runs
    check a cell; they are not the grid's results."""
    runs = {}
    for run in search(client, experiment, "tags.cell_key != ''"):
        if "lamp_grid.rerun_of" not in run.data.tags:
            runs.setdefault(run.data.tags["cell_key"], []).append(run)
    return runs


@dataclass
class CellResult:
    """A cell's outcome: the newest run of it with this data and settings."""
    cell: GridCell
    status: str  # an MLflow run status, or MISSING
    metrics: dict  # final dev metrics, "dev_<metric>"
    run_id: str | None
    environment: dict = field(default_factory=dict)  # its code and environment, as the run recorded them


def summarize(by_key: dict, cells: list, fingerprints: dict | None = None) -> list:
    """A CellResult per cell from its runs (cell_runs): its newest FINISHED run, else
    its newest run. With fingerprints, only runs on that data ((task, setting) -> fingerprint)
    and with the cell's settings count."""
    rows = []
    for cell in cells:
        runs = [r for r in by_key.get(cell.key, []) if fingerprints is None or (
            r.data.tags.get("data_fingerprint") == fingerprints[cell.cell.data]
            and r.data.tags.get("settings_hash") == cell.settings_hash)]
        finished = [r for r in runs if r.info.status == "FINISHED"]
        run = (finished or runs or [None])[0]
        rows.append(CellResult(cell, run.info.status if run else "MISSING",
                               {k: v for k, v in (run.data.metrics if run else {}).items() if k.startswith("dev_")},
                               run.info.run_id if run else None, recorded(run.data.tags) if run else {}))
    return rows


def newest_parent(client, experiment: str) -> str | None:
    """The run id of the grid's newest `run`, the parent of its cells."""
    runs = client.search_runs([experiment], "tags.`lamp_grid.role` = 'grid'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def start_parent(client, experiment: str, grid: str, record: dict, rerun_of: str | None = None) -> str:
    """The run of one `run` (or one `rerun`, named for the run it repeats), the parent of its cells' runs."""
    if rerun_of:
        name, tags = f"rerun of {rerun_of}", {"lamp_grid.role": "rerun", "lamp_grid.rerun_of": rerun_of}
    else:
        name, tags = f"{grid} grid", {"lamp_grid.role": "grid"}
    run = client.create_run(experiment, run_name=name, tags={**tags, "grid": grid, "lamp_grid_version": VERSION,
                                                             **record})
    return run.info.run_id


def create_child(client, experiment: str, parent: str, grid_cell, data_fingerprint: str, grid: str,
                 inputs: dict, record: dict, rerun_of: str | None = None) -> str:
    """The cell's run, named by its key: every axis a param, its identity in tags, a
    one-line description, the data it reads as dataset inputs (context -> Rendered),
    and what `rerun` needs to run it again (record: the command, the data, the
    resources and the code; the worker adds the environment). SCHEDULED until its
    trial starts."""
    from mlflow.entities import Param

    run = client.create_run(experiment, run_name=grid_cell.key, tags={
        "mlflow.parentRunId": parent, "lamp_grid.role": "cell", "grid": grid, "cell_key": grid_cell.key,
        "data_fingerprint": data_fingerprint, "settings_hash": grid_cell.settings_hash,
        "model": grid_cell.model, "lamp_grid_version": VERSION, NOTE: grid_cell.description, **record,
        **{f"lamp_grid.render.{context}": data.digest for context, data in inputs.items()},
        **({"lamp_grid.rerun_of": rerun_of} if rerun_of else {})})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in grid_cell.params().items()])
    if inputs:
        log_datasets(client, run.info.run_id, grid_cell.cell.task, inputs)
    client.update_run(run.info.run_id, status="SCHEDULED")
    return run.info.run_id


def log_datasets(client, run_id: str, task: str, inputs: dict) -> None:
    """The data a run reads, as MLflow dataset inputs: named by task and context,
    with the cache entry's content digest, so the UI tells runs on other data apart."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    client.log_inputs(run_id, datasets=[DatasetInput(
        Dataset(name=f"{task}-{context}", digest=data.digest, source_type="lamp-grid cache",
                source=json.dumps({"uri": data.path}), profile=json.dumps({"num_rows": data.rows})),
        tags=[InputTag("mlflow.data.context", context)]) for context, data in inputs.items()])


# A cell's run that decoded its task's test split (`run --predict-test`) carries this
# tag, naming its artifact: the file LaMP's leaderboard takes for the task.
TEST_PREDICTIONS = "lamp_grid.test_predictions"


def leaderboard_file(task: str) -> str:
    return f"{task}-test-predictions.json"


SAMPLE_PROMPTS = 20  # the prompts a cell keeps as an artifact, to read what the model saw


class MlflowLog:
    """Rank 0's writes to the cell's MLflow run."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri=uri), run_id

    def tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def train_order(self, epoch: int, batches: list) -> None:
        """The ids each optimizer step of the epoch trained on, the global batch in workers' rank order."""
        self.client.log_dict(self.run_id, {"epoch": epoch, "batches": batches}, f"train_order/epoch-{epoch}.json")

    def metrics(self, metrics: dict, step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def results(self, task: str, ids, golds, predictions, rows, ds_config) -> None:
        """Artifacts: LaMP-format predictions, per-example scores, sample prompts, the DeepSpeed config."""
        from lamp.metrics import score_examples  # deferred: it imports sklearn, which most commands never need

        per_example = score_examples(task, golds, predictions)
        with tempfile.TemporaryDirectory() as directory:
            out = Path(directory)
            (out / "predictions.json").write_text(json.dumps(
                {"task": task, "golds": [{"id": i, "output": p} for i, p in zip(ids, predictions)]}))
            (out / "per_example_scores.json").write_text(json.dumps(
                [{"id": i, "gold": g, "prediction": p, **{k: v[n] for k, v in per_example.items()}}
                 for n, (i, g, p) in enumerate(zip(ids, golds, predictions))]))
            (out / "sample_prompts.json").write_text(json.dumps(
                [{"id": r["id"], "prompt": r["prompt"], "retrieved": list(r["retrieved"]), "gold": r["output"]}
                 for r in rows[:SAMPLE_PROMPTS]], indent=1))
            (out / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=1))
            for path in sorted(out.iterdir()):
                self.client.log_artifact(self.run_id, str(path))

    def test_predictions(self, task: str, ids, predictions) -> None:
        """The test split's predictions in LaMP's submission format, the run's artifact
        `LaMP_k-test-predictions.json`, and the tag that says the run wrote them."""
        self.client.log_dict(self.run_id, {"task": task, "golds": [{"id": i, "output": p}
                                                                   for i, p in zip(ids, predictions)]},
                             leaderboard_file(task))
        self.tags({TEST_PREDICTIONS: leaderboard_file(task)})

    def model(self, model, tokenizer) -> None:
        """The model as an MLflow `transformers` model, the run's `model` artifact:
        `mlflow.transformers.load_model("runs:/<run id>/model", return_type="components")`."""
        import mlflow.transformers
        import torch
        import transformers

        portable_config(model)
        with tempfile.TemporaryDirectory() as directory:
            out = Path(directory) / "model"
            # transformers 5 has one generation pipeline, text-generation (text2text is gone): a
            # seq2seq model is saved under it and comes back whole as components. The requirements
            # are named: MLflow's own guess imports torchvision, which nothing here needs.
            mlflow.transformers.save_model(
                {"model": model, "tokenizer": tokenizer}, str(out), task="text-generation",
                pip_requirements=[f"transformers=={transformers.__version__}",
                                  f"torch=={torch.__version__.split('+')[0]}"])
            self.client.log_artifacts(self.run_id, str(out), "model")


def describe_invocation(client, parent: str) -> None:
    """Marks the parent run as this process's: its host, its process and when it started."""
    import psutil
    from mlflow.entities import RunTag

    me = psutil.Process()
    client.log_batch(parent, tags=[RunTag("lamp_grid.host", socket.gethostname()),
                                   RunTag("lamp_grid.pid", str(me.pid)),
                                   RunTag("lamp_grid.process_started", str(me.create_time())),
                                   RunTag("lamp_grid.heartbeat", str(time.time()))])


@contextmanager
def heartbeat(client, parent: str):
    """While the block runs, the parent run's `lamp_grid.heartbeat` is kept fresh: what
    another host's `run` reads to tell a live invocation from a dead one."""
    describe_invocation(client, parent)
    done = threading.Event()

    def beat():
        while not done.wait(HEARTBEAT_S):
            try:
                client.set_tag(parent, "lamp_grid.heartbeat", str(time.time()))
            except Exception:  # a store briefly out of reach: the next beat tries again
                pass

    thread = threading.Thread(target=beat, name="lamp-grid heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


def invocation_alive(run) -> bool:
    """Whether the `run` invocation that made this parent run is alive: on this host,
    its process (the same one: pid and start time); elsewhere, a fresh heartbeat."""
    import psutil

    tags = run.data.tags
    if run.info.status not in OPEN or "lamp_grid.heartbeat" not in tags:
        return False
    if tags.get("lamp_grid.host") == socket.gethostname():
        try:
            started = psutil.Process(int(tags["lamp_grid.pid"])).create_time()
        except (KeyError, ValueError, psutil.Error):
            return False
        return abs(started - float(tags["lamp_grid.process_started"])) < 1
    return time.time() - float(tags["lamp_grid.heartbeat"]) < STALE_S


def close_dead_runs(client, experiment: str, log=print) -> None:
    """Marks KILLED every run left RUNNING or SCHEDULED by a `run` that is gone (killed
    with SIGKILL, its head lost), parent and children, and says so."""
    verdicts, dead = {}, []
    for status in OPEN:
        for run in search(client, experiment, f"attributes.status = '{status}'"):
            tags = run.data.tags
            parent = run.info.run_id if tags.get("lamp_grid.role") in ("grid", "rerun") else tags.get(
                "mlflow.parentRunId")
            if parent not in verdicts:
                verdicts[parent] = parent is not None and invocation_alive(client.get_run(parent))
            if not verdicts[parent]:
                dead.append(run)
    for run in dead:
        client.set_terminated(run.info.run_id, "KILLED")
    if dead:
        gone = sorted(p for p, alive in verdicts.items() if p and not alive)
        log(f"marked {len(dead)} run(s) KILLED that an earlier `run` left open and can no longer finish "
            f"(grid run(s) {', '.join(p[:8] for p in gone)}: process gone or heartbeat stale)")


@contextmanager
def system_metrics(uri: str, run_id: str, gpus: tuple = ()):
    """MLflow's system metrics (CPU, memory, disk, network; GPU use and memory where
    NVIDIA's library finds a GPU) logged to the run from this process's node. gpus:
    the UUIDs of the GPUs that are the run's, the only ones logged (`gpu_0` is the
    first): NVIDIA's library lists every GPU of the node, other trials' included."""
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_S, resume_logging=True,
                                   tracking_uri=uri)
    wanted = {uuid.removeprefix("GPU-") for uuid in gpus}
    for gpu_monitor in (m for m in monitor.monitors if isinstance(m, GPUMonitor)):
        import pynvml  # there is a GPU monitor only where MLflow imported it

        gpu_monitor.gpu_handles = [h for h in gpu_monitor.gpu_handles
                                   if str(pynvml.nvmlDeviceGetUUID(h)).removeprefix("GPU-") in wanted]
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        # The monitor logs once per interval, and drops what it sampled since: log that too,
        # or a run shorter than one interval would show no system metrics at all.
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()


def close_open_runs(client, run_ids, status: str) -> None:
    """Ends every run still SCHEDULED or RUNNING with `status` (FAILED or KILLED)."""
    for run_id in run_ids:
        if client.get_run(run_id).info.status in OPEN:
            client.set_terminated(run_id, status)
