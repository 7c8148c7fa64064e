"""Benchmark: the floor of a grid's trials, Tune trials whose Ray Train run does no work.

Each trial is what `run` makes of a cell, less the cell: `run`'s Tune trial
driver (a sliver of CPU) fits `run`'s TorchTrainer (grid.trial.driver.cell_trainer:
one worker of 0.5 CPU, a Ray Data train set, TuneReportCallback, checkpoints
kept, rank 0 logging system metrics to the cell's MLflow run, made beforehand
as `run` makes them).
The training function imports torch, DeepSpeed and transformers, as the real
one does, and reports three epochs with a small checkpoint each. Trials run as
many at a time as `run` would start (grid.run.trials_that_fit). What is left
is Ray Train's and Tune's own cost per cell: the processes each run starts
(controller, worker, placement-group cleaner, synchronization actor, dataset
manager, Tune's report queue) and the worker's imports.

The machine's speed that hour is measured in the same run, as a baseline: a
single-threaded Python loop. The demo's 12 trials cannot take less than
`trials_s_for_12`, whatever a cell trains.

    python bench/trial_floor.py [--trials 6]
"""

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import ray
import ray.data
import ray.train
from mlflow.tracking import MlflowClient
from ray import tune
from report import write_result  # bench/report.py: scripts run from bench/

from grid.cluster import ensure_ray, trials_that_fit
from grid.run import new_tuner, trainable
from grid.spec import Resources
from grid.trial.driver import cell_trainer

EPOCHS = 3


def train_nothing(config: dict) -> None:
    import deepspeed  # noqa: F401 (the real worker's imports, without its work)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    for epoch in range(EPOCHS):
        with tempfile.TemporaryDirectory() as directory:
            Path(directory, "state.json").write_text("{}")
            ray.train.report({"epoch": epoch}, checkpoint=ray.train.Checkpoint.from_directory(directory))


def empty_trial(config: dict, resources: Resources, storage: str, tracking_uri: str, run_ids: list) -> None:
    """A trial as grid.trial.driver.run_trial makes it, less the cell: the same Ray Train run."""
    train = pa.table({"input_ids": [[1] * 90] * 1000, "labels": [[1] * 10] * 1000})
    cell_trainer(train_nothing, {"tracking_uri": tracking_uri, "run_id": run_ids[config["cell"]]},
                 {"train": ray.data.from_arrow(train)}, resources, tune.get_context().get_trial_id(), storage).fit()


def busy_cpu_s() -> float:
    """CPU-seconds the whole machine has spent busy (all processes, /proc/stat)."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def python_loop_s() -> float:
    start = time.perf_counter()
    sum(i * i for i in range(10 ** 7))
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--out", default="bench/results/trial_floor.json")
    args = parser.parse_args()
    storage = tempfile.mkdtemp(prefix="lamp-floor-")
    try:
        calibration = python_loop_s()
        ensure_ray()
        resources = Resources()
        at_once = trials_that_fit(resources)
        tracking_uri = f"sqlite:///{storage}/mlflow.db"
        client = MlflowClient(tracking_uri)
        experiment = client.create_experiment("floor")
        run_ids = [client.create_run(experiment).info.run_id for _ in range(args.trials)]
        cpu, start = busy_cpu_s(), time.perf_counter()
        tuner = new_tuner(trainable(empty_trial, resources=resources, storage=storage, tracking_uri=tracking_uri,
                                    run_ids=run_ids),
                          [f"trial-{n}" for n in range(args.trials)], "floor", storage, at_once, retries=0)
        grid = tuner.fit()
        wall, cpu = time.perf_counter() - start, busy_cpu_s() - cpu
        assert not grid.errors, grid.errors
        result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                  "python_loop_s": round(calibration, 2), "trials": args.trials, "at_once": at_once,
                  "wall_s": round(wall, 1), "machine_cpu_s": round(cpu, 1),
                  "cpu_s_per_trial": round(cpu / args.trials, 1), "wall_s_per_trial": round(wall / args.trials, 1),
                  "trials_s_for_12": round(12 * wall / args.trials)}
        write_result(result, args.out)
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)


if __name__ == "__main__":
    main()
