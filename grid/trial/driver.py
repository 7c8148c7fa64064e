"""The Tune side of a trial: `run_trial` runs one cell start to finish and keeps its
MLflow run truthful. A fine-tuned or zero-shot cell is a Ray Train run
(`cell_trainer`, a TorchTrainer) named by the trial id, so that a retry with the
same storage resumes from the last checkpoint, its random state included: a retry
ends as if never stopped. The `vote` model trains nothing and runs here.
"""

import time
from dataclasses import asdict

from grid.environment import environment_tags
from grid.render import CellPrompts
from grid.examples import load_examples
from grid.storage import join
from grid.tracking import MlflowLog, system_metrics
from grid.trial.loop import finish, train_cell, zero_shot_cell
from lamp.vote import vote


def run_trial(config: dict, plan) -> None:
    """A Tune function trainable: one cell, start to finish, its MLflow run kept truthful."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    index = config["cell"]
    grid_cell, run_id = plan.cells[index], plan.run_ids[index]
    client = MlflowClient(tracking_uri=plan.tracking_uri)
    client.update_run(run_id, status="RUNNING")
    try:
        if not plan.model.has_weights:
            with system_metrics(plan.tracking_uri, run_id):
                MlflowLog(plan.tracking_uri, run_id).tags(environment_tags(None))
                metrics = run_vote(grid_cell, plan, run_id)
            tune.report(metrics)
        else:
            fine_tune(grid_cell, plan, run_id, tune.get_context().get_trial_id())
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def fine_tune(grid_cell, plan, run_id: str, trial_id: str) -> None:
    """Fits the cell's Train run on its rendered splits (rendered before the grid
    started): train delivered by Ray Data to every worker, dev and selection rows read
    by each worker."""
    trial_start = time.time()
    cell, training = grid_cell.cell, grid_cell.training
    rendered = plan.renders[grid_cell.key]
    settings = {**asdict(training), "task": cell.task, "seed": cell.seed, "recipe": cell.recipe,
                "epochs": training.epochs_for(cell.task)}
    config = {"settings": settings, "model": plan.model, "run_id": run_id, "trial_start": trial_start,
              "tracking_uri": plan.tracking_uri, "zero_stage": plan.resources.zero_stage,
              "best_dir": join(plan.storage, trial_id, "best"), "log_model": plan.log_model,
              "dev": rendered["dev"], "test": rendered.get("test"), "threads": plan.resources.threads()}
    MlflowLog(plan.tracking_uri, run_id).metrics(prompt_statistics(rendered))
    if settings["epochs"] == 0:
        cell_trainer(zero_shot_cell, config, {}, plan.resources, trial_id, plan.storage).fit()
        return
    train, share = rendered["train"], training.selection_share
    datasets = {"train": train.dataset(["row", "id", "input_ids", "labels"], held_out=False, share=share)}
    config.update(select=train)
    cell_trainer(train_cell, config, datasets, plan.resources, trial_id, plan.storage).fit()


def prompt_statistics(rendered: dict) -> dict:
    """Per split, what the prompts actually showed: the mean number of profile items,
    and the share of examples whose task input lost its tail to the budget."""
    return {f"{split}_{name}": r.stats[name] for split, r in rendered.items() for name in ("items_shown",
                                                                                           "input_cut_share")}


def cell_trainer(train_loop, config: dict, datasets: dict, resources, name: str, storage: str):
    """A cell's Ray Train run: the TorchTrainer a Tune trial fits, named by the trial id
    so that a retry with the same storage resumes it, its results reported to Tune."""
    from ray.train import CheckpointConfig, DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    return TorchTrainer(
        monitored(train_loop),
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=resources.workers_per_trial, use_gpu=resources.gpus_per_worker > 0,
            resources_per_worker=resources.per_worker()),
        datasets=datasets,
        # Not split: every worker reads the whole train set, and grid/order.py deals
        # each global batch over the workers (no split coordinator actor either).
        dataset_config=DataConfig(datasets_to_split=[]),
        run_config=RunConfig(name=name, storage_path=storage, checkpoint_config=CheckpointConfig(num_to_keep=1),
                             callbacks=[TuneReportCallback()]),
    )


def monitored(train_loop):
    """The train loop, with rank 0 logging system metrics to the cell's run from the
    node that does the work (where the GPUs are; the trial's driver may be on a CPU head)."""
    def loop(config: dict) -> None:
        import ray.train
        import ray.train.torch
        import torch

        if ray.train.get_context().get_world_rank():
            return train_loop(config)
        gpus = [str(torch.cuda.get_device_properties(d).uuid) for d in ray.train.torch.get_devices()
                if d.type == "cuda"]
        with system_metrics(config["tracking_uri"], config["run_id"], tuple(gpus)):
            return train_loop(config)

    return loop


def run_vote(grid_cell, plan, run_id: str) -> dict:
    """The `vote` model: no training, a prediction from the retrieved items alone."""
    cell, splits = grid_cell.cell, plan.shards[grid_cell.cell.data]
    examples, retrieved, predictions = vote_split(cell, splits, "dev", grid_cell.training.limit_dev)
    rows = [{"id": e.id, "prompt": e.input, "retrieved": [i["id"] for i in items], "output": e.output}
            for e, items in zip(examples, retrieved)]
    test = None
    if plan.predict_test and "test" in splits:  # the whole split: a submission holds every test id
        test_examples, _, test_predictions = vote_split(cell, splits, "test", None)
        test = [e.id for e in test_examples], test_predictions
    return finish(MlflowLog(plan.tracking_uri, run_id), cell.task, rows, predictions, {}, test=test)


def vote_split(cell, splits: dict, split: str, limit: int | None) -> tuple:
    """(the split's first `limit` examples, the items the cell retrieves for each, the votes)."""
    prompts = CellPrompts(splits[split], cell, splits=splits)
    examples = load_examples(splits[split].examples)[: limit or None]
    retrieved = [prompts.retrieved(row, e) for row, e in enumerate(examples)]
    return examples, retrieved, [vote(cell.task, e.input, items) for e, items in zip(examples, retrieved)]
