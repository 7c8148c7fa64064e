"""What each Ray Train worker of a cell runs: `train_cell` fine-tunes, `zero_shot_cell`
(a cell with `epochs: 0`) decodes with the model as it comes.

`train_cell` receives the cell's rendered train split from Ray Data, reads its
share of each global batch in the order grid/order.py builds from (seed, epoch),
trains with DeepSpeed at the ZeRO stage asked, selects the epoch on a
user-disjoint slice held out from train, and at the end decodes dev, and test
where the grid predicts it, with the selected epoch's weights and beam search
(selection, dev and test rows are read from the render cache by each worker).
Every cell, the vote baseline's included (grid/trial/driver.py), ends through
`finish`: rank 0 scores the dev predictions with LaMP's metrics and logs them,
and the test predictions in LaMP's submission format, to the cell's MLflow run.
"""

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from grid.environment import environment_tags
from grid.order import TrainRows, global_batches, worker_share
from grid.tracking import MlflowLog
from grid.trial.decoding import evaluate_rows, load_tokenizer
from grid.trial.hardware import (
    all_gather,
    all_reduce,
    deepspeed_config,
    deepspeed_engine,
    inference_model,
    native_bf16,
    peak_gpu_memory,
    worker_device,
)
from grid.trial.weights import BestEpoch, load_state, resume_training_state, save_training_state
from lamp.metrics import aggregate
from lamp.tasks import get_task

EVAL_COLUMNS = ["id", "prompt", "retrieved", "output", "prompt_ids"]


def train_cell(config: dict) -> None:
    """Runs on every Train worker: fine-tune, select, evaluate; rank 0 logs."""
    import ray.train
    import torch

    device = worker_device(config)
    settings, task, model_ref = config["settings"], config["settings"]["task"], config["model"]
    epochs, zero_stage = settings["epochs"], config["zero_stage"]
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    torch.manual_seed(settings["seed"])

    tokenizer = load_tokenizer(model_ref)
    model = model_ref.load()
    n_params = sum(p.numel() for p in model.parameters())
    # Every worker holds every train row: the order deals any row to any worker (grid/order.py).
    rows = TrainRows.read(ray.train.get_dataset_shard("train"))
    total_steps = math.ceil(len(rows) / settings["batch_size"]) * epochs
    ds_config = deepspeed_config(settings, zero_stage, total_steps, native_bf16(device), world)
    engine = deepspeed_engine(model, device, ds_config)

    best = BestEpoch(config["best_dir"], get_task(task).higher_is_better)
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a retry of this trial: carry on from the last training state saved, as if never stopped
        start_epoch = resume_training_state(engine, device, rank, checkpoint, best)
    log = cell_log(config, device, rank)
    clock = Clock()
    select_rows = None  # read when first needed: training starts at once, whatever the data's size
    for epoch in range(start_epoch, epochs):
        losses, read = train_epoch(engine, rows, tokenizer.pad_token_id, config, epoch, rank, world, clock)
        (loss_sum,) = all_reduce([sum(losses)], engine.device)
        batches = gather_steps(read)
        if select_rows is None:
            select_rows = config["select"].table(EVAL_COLUMNS, held_out=True, share=settings["selection_share"]
                                                 ).to_pylist()
        metric = select_metric(engine, tokenizer, select_rows, config)
        saving = time.time()
        best.offer(metric, epoch, engine, zero_stage, rank)
        metrics = {"epoch": epoch, "train_loss": loss_sum / max(len(losses), 1),
                   f"select_{get_task(task).main_metric}": metric}
        if log:
            log.metrics(metrics, step=epoch)
            log.train_order(epoch, batches)
        if (epoch + 1) % settings["checkpoint_every"] == 0 or epoch == epochs - 1:  # what a retry resumes from
            directory = save_training_state(engine, device, rank, epoch, best)
            # Ray uploads the training state in the background and deletes the local copy.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
            best.checkpointed(rank)
        else:
            ray.train.report(metrics)
        clock.checkpoint_s += time.time() - saving
    clock.loop_end = time.time()

    if best.state is not None:
        load_state(engine, best.state, zero_stage)
    dev_rows, predictions, decode_per_s = decode_split(engine.module, engine.device, tokenizer, config, zero_stage)
    test = decode_test(engine.module, engine.device, tokenizer, config, zero_stage)
    measures = {"best_epoch": best.epoch, "n_params": n_params, "decode_examples_per_s": decode_per_s,
                **clock.speeds(engine.device), **peak_gpu_memory(device)}
    final = finish(log, task, dev_rows, predictions, measures, ds_config, test)
    if log and config["log_model"] and best.state is not None:
        best_model = model_ref.load()
        best_model.load_state_dict(best.state)
        log.model(best_model, tokenizer)
    if log and clock.first_step:  # the fixed cost of a trial, around the training steps
        log.metrics(clock.fixed_cost(config["trial_start"]))
    ray.train.report(final)


def train_epoch(engine, rows: TrainRows, pad_id: int, config: dict, epoch: int, rank: int, world: int,
                clock: "Clock") -> tuple:
    """The epoch's optimizer steps, each on this worker's share of a global batch:
    (this worker's losses, the ids each step read)."""
    settings, decoder_only = config["settings"], config["model"].decoder_only
    engine.train()  # dropout on (from_pretrained gives a model in eval mode; selection leaves it so)
    losses, read = [], []
    for step, batch in enumerate(global_batches(rows.lengths, settings["batch_size"], settings["seed"], epoch)):
        crash_once(config, f"{epoch}:{step}")
        mine = worker_share(batch, rank, world)
        step_start = time.time()
        # A worker whose share of a last, short batch is empty still steps with the
        # others (their gradients are averaged): on a row of the batch, weighted 0.
        inputs = rows.tensors(mine if len(mine) else batch[:1], pad_id)
        mean = engine(**{k: v.to(engine.device) for k, v in inputs.items()}).loss
        # The global batch's loss is the mean over all its label tokens, whoever
        # reads them: this worker's part is its tokens' sum over the batch's count.
        # DeepSpeed averages gradients over the workers, hence x world.
        loss = mean * (int(rows.scored[mine].sum()) / int(rows.scored[batch].sum()))
        engine.backward(loss * world)
        engine.step()
        losses.append(loss.item())
        read.append([rows.ids[i] for i in mine])
        # A decoder-only model reads its answer as part of its input: count it once.
        tokens = int(rows.lengths[mine].sum()) + (0 if decoder_only else int(rows.scored[mine].sum()))
        clock.stepped(step_start, len(mine), tokens)
    return losses, read


def gather_steps(read: list) -> list:
    """The ids each step read, over the trial's workers in rank order: the epoch's global batches as trained."""
    parts = all_gather(read)
    return [[i for part in parts for i in part[step]] for step in range(len(read))]


def select_metric(engine, tokenizer, rows: list, config: dict) -> float:
    """The epoch's main metric on the selection slice, decoded greedily (0 on no rows)."""
    settings = config["settings"]
    predictions = evaluate_rows(engine.module, engine.device, tokenizer, rows, settings, 1,
                                config["model"].decoder_only, config["zero_stage"])
    if not rows:
        return 0.0
    task = settings["task"]
    return aggregate(task, [r["output"] for r in rows], predictions)[get_task(task).main_metric]


@dataclass
class Clock:
    """Where a worker's time went: its training steps, its checkpoints (selection
    writes included), and the trial's fixed cost around the steps."""
    train_s: float = 0.0
    checkpoint_s: float = 0.0
    examples: int = 0
    tokens: int = 0
    first_step: float | None = None
    last_step: float | None = None
    loop_start: float = field(default_factory=time.time)  # the epochs' loop: made just before it
    loop_end: float = 0.0

    def stepped(self, step_start: float, examples: int, tokens: int) -> None:
        self.last_step = time.time()
        self.first_step = self.first_step or step_start
        self.train_s += self.last_step - step_start
        self.examples += examples
        self.tokens += tokens

    def speeds(self, device) -> dict:
        """Training's throughput over the trial's workers (the slowest worker's time);
        nothing for a retry that resumed after the last epoch, which trained nothing."""
        examples, tokens = all_reduce([self.examples, self.tokens], device)
        train_s, checkpoint_s = all_reduce([self.train_s, self.checkpoint_s], device, op="max")
        if not train_s:
            return {}
        return {"train_s": train_s, "train_examples_per_s": examples / train_s, "train_tokens_per_s": tokens / train_s,
                "checkpoint_s": checkpoint_s,
                "checkpoint_share": checkpoint_s / max(self.loop_end - self.loop_start, 1e-9)}

    def fixed_cost(self, trial_start: float) -> dict:
        return {"trial_start_to_first_step_s": self.first_step - trial_start,
                "last_step_to_results_logged_s": time.time() - self.last_step,
                "trial_s": time.time() - trial_start}


def zero_shot_cell(config: dict) -> None:
    """Runs on every Train worker of a zero-shot cell: the model as it comes, for
    inference only. No DeepSpeed engine and no optimizer (an 11B model would need
    about 110 GB for AdamW's states); bf16 where native; a worker with several GPUs
    spreads the model over them."""
    import ray.train
    import torch

    device = worker_device(config)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object gather of the predictions uses the current device
    rank = ray.train.get_context().get_world_rank()
    tokenizer = load_tokenizer(config["model"])
    model = inference_model(config["model"], device)
    n_params = sum(p.numel() for p in model.parameters())
    log = cell_log(config, device, rank)
    dev_rows, predictions, decode_per_s = decode_split(model, device, tokenizer, config, zero_stage=0)
    test = decode_test(model, device, tokenizer, config, zero_stage=0)
    measures = {"n_params": n_params, "decode_examples_per_s": decode_per_s, **peak_gpu_memory(device)}
    ray.train.report(finish(log, config["settings"]["task"], dev_rows, predictions, measures, test=test))


def cell_log(config: dict, device, rank: int) -> MlflowLog | None:
    """Rank 0's writer to the cell's MLflow run, the environment it runs in tagged; None on other workers."""
    if rank:
        return None
    log = MlflowLog(config["tracking_uri"], config["run_id"])
    log.tags(environment_tags(device))
    return log


def decode_split(model, device, tokenizer, config: dict, zero_stage: int, split: str = "dev") -> tuple:
    """(the split's rows, their predictions by beam search, the examples decoded per second)."""
    settings = config["settings"]
    rows = config[split].table(EVAL_COLUMNS).to_pylist()
    start = time.time()
    predictions = evaluate_rows(model, device, tokenizer, rows, settings, settings["beams"],
                                config["model"].decoder_only, zero_stage)
    return rows, predictions, len(rows) / (time.time() - start)


def decode_test(model, device, tokenizer, config: dict, zero_stage: int) -> tuple | None:
    """(the test ids, their predictions) where the cell predicts its test split; else None."""
    if config.get("test") is None:
        return None
    rows, predictions, _ = decode_split(model, device, tokenizer, config, zero_stage, "test")
    return [r["id"] for r in rows], predictions


def finish(log: MlflowLog | None, task: str, rows: list, predictions: list, measures: dict,
           ds_config: dict | None = None, test: tuple | None = None) -> dict:
    """A cell's end, whatever its model: its dev metrics (the predictions for `rows`
    scored) and its other measures. With a log (rank 0's), they are logged to the
    cell's run with the predictions, per-example scores, sample prompts and the
    DeepSpeed config (empty without DeepSpeed); test, (ids, predictions) of the
    test split, as LaMP's submission file. Test golds are hidden: nothing is scored."""
    golds = [r["output"] for r in rows]
    final = {f"dev_{k}": v for k, v in aggregate(task, golds, predictions).items()} | measures
    if log:
        log.metrics(final)
        log.results(task, [r["id"] for r in rows], golds, predictions, rows, ds_config or {})
        if test is not None:
            log.test_predictions(task, *test)
    return final


def crash_once(config: dict, position: str) -> None:
    """Fault injection for tests: with LAMP_GRID_CRASH_ONCE naming a directory, the
    first attempt of each trial dies (a marker file there records it) before the
    training step LAMP_GRID_CRASH_AT=EPOCH:STEP."""
    directory = os.environ.get("LAMP_GRID_CRASH_ONCE")
    if not directory or position != os.environ.get("LAMP_GRID_CRASH_AT"):
        return
    marker = Path(directory) / config["run_id"]
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        raise RuntimeError(f"LAMP_GRID_CRASH_ONCE: first attempt of run {config['run_id']} crashes on purpose"
                           f" at epoch:step {position}")
