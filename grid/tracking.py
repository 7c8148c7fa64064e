"""MLflow tracking: one experiment per grid, a parent run per `run`, a child run per cell.

Child runs are created by the driver before any trial starts, so a trial and
all its retries log into the one run the driver made for its cell. A run that
waits is SCHEDULED; the trial marks it RUNNING, then FINISHED or FAILED; when
`run` exits (Ctrl-C included) nothing is left SCHEDULED or RUNNING.
"""

import subprocess
from pathlib import Path

from lamp.errors import LampError

VERSION = "0.1.0"
OPEN = ("SCHEDULED", "RUNNING")


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


def experiment_id(client, name: str, artifact_location: str | None = None) -> str:
    """The grid's experiment, created (before any trial starts) if it is new."""
    experiment = find_experiment(client, name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_location)
    return experiment.experiment_id


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cell_runs(client, experiment: str) -> dict:
    """cell key -> the experiment's runs of that cell, newest first."""
    runs, token = {}, None
    while True:
        page = client.search_runs([experiment], "tags.cell_key != ''", max_results=1000, page_token=token,
                                  order_by=["attributes.start_time DESC"])
        for run in page:
            runs.setdefault(run.data.tags["cell_key"], []).append(run)
        token = page.token
        if not token:
            return runs


def newest_parent(client, experiment: str) -> str | None:
    """The run id of the grid's newest `run`, the parent of its cells."""
    runs = client.search_runs([experiment], "tags.`lamp_grid.role` = 'grid'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def start_parent(client, experiment: str, grid: str, tags: dict) -> str:
    run = client.create_run(experiment, run_name=f"{grid} grid",
                            tags={"lamp_grid.role": "grid", "grid": grid, "git_commit": git_commit(),
                                  "lamp_grid_version": VERSION, **tags})
    return run.info.run_id


def create_child(client, experiment: str, parent: str, grid_cell, data_fingerprint: str, grid: str) -> str:
    """The cell's run: every axis a param, its identity in tags, SCHEDULED until its trial starts."""
    from mlflow.entities import Param

    run = client.create_run(experiment, run_name=grid_cell.key, tags={
        "mlflow.parentRunId": parent, "lamp_grid.role": "cell", "grid": grid, "cell_key": grid_cell.key,
        "data_fingerprint": data_fingerprint, "settings_hash": grid_cell.settings_hash,
        "model": grid_cell.model, "git_commit": git_commit(), "lamp_grid_version": VERSION})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in grid_cell.params().items()])
    client.update_run(run.info.run_id, status="SCHEDULED")
    return run.info.run_id


def close_open_runs(client, run_ids, status: str) -> None:
    """Ends every run still SCHEDULED or RUNNING with `status` (FAILED or KILLED)."""
    for run_id in run_ids:
        if client.get_run(run_id).info.status in OPEN:
            client.set_terminated(run_id, status)
