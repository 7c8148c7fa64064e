"""One grid cell as a Ray Tune trial: fine-tune with Ray Train + DeepSpeed, evaluate, log.

The Tune trial (`run_trial`) is a function that builds a TorchTrainer (Ray
Train V2) named by the trial id, so a retry with the same storage resumes from
the last checkpoint, its random state included: a retry ends as if never
stopped. Each Train worker (`train_cell`) receives the cell's rendered train
split from Ray Data (a Ray Dataset read from the render cache), reads its share
of each global batch in the order grid/order.py builds from (seed, epoch),
trains with `deepspeed.initialize` at the ZeRO stage asked, selects the epoch
on a user-disjoint slice held out from train, and at the end generates on dev
with beam search (selection and dev rows read from the cache by each worker).
Rank 0 scores the predictions with LaMP's metrics and logs everything to the
cell's MLflow run, with the environment it ran in. A zero-shot cell (`epochs:
0`) loads the model for inference only (`zero_shot_cell`).

Everything about the hardware is decided on the worker, from what Ray gave it:
the device, DeepSpeed's accelerator, the precision and the CPU threads. The
command may run on a head node with no GPU at all.
"""

import argparse
import io
import json
import math
import os
import random
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from grid.environment import environment_tags
from grid.order import TrainRows, global_batches, pad, worker_share
from grid.tracking import system_metrics
from lamp.metrics import aggregate, score_examples
from lamp.recipes import get_recipe
from lamp.tasks import get_task

SAMPLE_PROMPTS = 20


# --- the worker's hardware ---------------------------------------------------------------


def worker_device(config: dict):
    """The device Ray Train gave this worker, set up for repeatable numbers; DeepSpeed's
    accelerator is set to match before DeepSpeed is imported. (The machine that ran the
    command may be a CPU head: nothing it knows about hardware holds here.)

    The CPU threads are the trial's setting, not the shell's OMP_NUM_THREADS: a sum
    split over another number of threads may round differently. With `deterministic`
    (a training setting, on by default), torch takes its deterministic kernels, and
    cuBLAS a fixed workspace, which its deterministic mode needs (set before CUDA
    starts it)."""
    import ray.train.torch
    import torch

    if config["settings"]["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: an op with no deterministic kernel (some CUDA ones) warns instead of failing the cell.
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Not NaN-filling every new tensor: DeepSpeed allocates its gradient buckets anew each
        # step, and filling them made a CPU step 30 times slower. It guards only against
        # reading memory never written.
        torch.utils.deterministic.fill_uninitialized_memory = False
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    os.environ["DS_ACCELERATOR"] = "cuda" if device.type == "cuda" else "cpu"
    return device


def native_bf16(device) -> bool:
    """bf16 only where the GPU computes it natively (Ampere and newer). torch's
    is_bf16_supported() also counts emulation, slow on T4 or V100; fp16 overflows
    in T5, so those train in fp32."""
    import torch

    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def micro_batch(batch_size: int, world: int) -> int:
    """Each worker's share of the grid's batch: the batch is the global one, so a
    cell's results do not change with --workers-per-trial."""
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} cannot be split evenly over {world} workers")
    return batch_size // world


def deepspeed_config(settings: dict, zero_stage: int, total_steps: int, use_bf16: bool, world: int) -> dict:
    """The study's optimizer and schedule (AdamW, linear warmup then linear decay) for DeepSpeed."""
    return {
        "train_batch_size": settings["batch_size"],
        "train_micro_batch_size_per_gpu": micro_batch(settings["batch_size"], world),
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": settings["lr"], "weight_decay": settings["weight_decay"],
                                                  "torch_adam": True}},
        "scheduler": {"type": "WarmupDecayLR", "params": {
            "total_num_steps": max(total_steps, 1), "warmup_min_lr": 0, "warmup_max_lr": settings["lr"],
            "warmup_num_steps": max(1, int(settings["warmup"] * total_steps)), "warmup_type": "linear"}},
        # gloo (CPU) has no reduce_scatter: all-reduce works everywhere.
        "zero_optimization": {"stage": zero_stage, "reduce_scatter": False,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": use_bf16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def full_state(engine, zero_stage: int) -> dict:
    """A CPU copy of the model's full weights (gathered first under ZeRO-3)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=zero_stage == 3):
        return {k: v.detach().to("cpu", copy=True) for k, v in engine.module.state_dict().items()}


def load_state(engine, state: dict, zero_stage: int) -> None:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=zero_stage == 3):
        engine.module.load_state_dict(state)


def all_reduce(values: list, device, op: str = "sum") -> list:
    """Sums (or maxes) numbers over the trial's workers. The tensor lives on the
    worker's device: NCCL, Ray Train's backend on GPUs, refuses CPU tensors."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor.tolist()


# --- evaluation ---------------------------------------------------------------------------


def generate(model, device, tokenizer, rows: list, settings: dict, beams: int, decoder_only: bool,
             synced_gpus: bool) -> list:
    """Predictions for this worker's rows, in order. Decoded in batches of similar
    length (sorted, then put back), so that little of a batch is padding."""
    import torch

    recipe = get_recipe(settings["recipe"])
    decoding = recipe.decoding(settings["task"], beams, decoder_only)
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt_ids"]))
    predictions = [None] * len(rows)
    with torch.no_grad():
        for start in range(0, len(order), settings["eval_batch_size"]):
            picked = order[start:start + settings["eval_batch_size"]]
            ids = [rows[i]["prompt_ids"] for i in picked]
            input_ids = pad(ids, tokenizer.pad_token_id, left=decoder_only).to(device)
            mask = pad([[1] * len(s) for s in ids], 0, left=decoder_only).to(device)
            out = model.generate(input_ids=input_ids, attention_mask=mask, pad_token_id=tokenizer.pad_token_id,
                                 repetition_penalty=settings["repetition_penalty"], synced_gpus=synced_gpus,
                                 **decoding)
            if decoder_only:
                out = out[:, input_ids.shape[1]:]
            for i, text in zip(picked, tokenizer.batch_decode(out, skip_special_tokens=True)):
                predictions[i] = recipe.answer(text, decoder_only)
    return predictions


def evaluate_rows(model, device, tokenizer, rows: list, settings: dict, beams: int, decoder_only: bool,
                  zero_stage: int) -> tuple:
    """(ids, predictions) over all rows, each worker generating for its share; every worker gets all."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    # Equal shares (the last row repeated) so that ZeRO-3's synced generation lines up.
    share = math.ceil(len(rows) / world) if rows else 0
    padded = rows + rows[-1:] * (share * world - len(rows))
    mine = padded[rank * share:(rank + 1) * share]
    predictions = generate(model, device, tokenizer, mine, settings, beams, decoder_only,
                           synced_gpus=zero_stage == 3 and world > 1)
    flat = [p for part in all_gather(predictions) for p in part][:len(rows)]
    return [r["id"] for r in rows], flat


def all_gather(value) -> list:
    """Every worker's `value`, in rank order, on every worker."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def gather_steps(read: list) -> list:
    """The ids each step read, over the trial's workers in rank order: the epoch's global batches as trained."""
    parts = all_gather(read)
    return [[i for part in parts for i in part[step]] for step in range(len(read))]


def random_state(device) -> dict:
    """This worker's random generators: what its next draws (dropout) depend on."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_random_state(state: dict, device) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def main_metric(task: str, golds: list, predictions: list) -> float:
    return aggregate(task, golds, predictions)[get_task(task).main_metric]


# --- the Ray Train worker loop ----------------------------------------------------------


def load_tokenizer(model_ref):
    """The model's tokenizer (model_ref: a grid.model.ModelRef), with a pad token for
    decoding in batches: a causal LM's may have none, and its eos pads then."""
    tokenizer = model_ref.tokenizer()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def train_cell(config: dict) -> None:
    """Runs on every Train worker: fine-tune, select, evaluate; rank 0 logs."""
    import ray.train
    import torch

    device = worker_device(config)
    import deepspeed  # after worker_device(): it picks its accelerator at import

    settings, task = config["settings"], config["settings"]["task"]
    spec = get_task(task)
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    torch.manual_seed(settings["seed"])
    crash_once(config)

    model_ref, decoder_only = config["model"], config["model"].decoder_only
    tokenizer = load_tokenizer(model_ref)
    model = model_ref.load()
    n_params = sum(p.numel() for p in model.parameters())
    use_bf16 = native_bf16(device)
    epochs, batch_size = settings["epochs"], settings["batch_size"]
    # Every worker holds every train row: the order deals any row to any worker (grid/order.py).
    rows = TrainRows.read(ray.train.get_dataset_shard("train"))
    steps_per_epoch = math.ceil(len(rows) / batch_size)
    ds_config = deepspeed_config(settings, config["zero_stage"], steps_per_epoch * epochs, use_bf16, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # On CPU, DeepSpeed compiles a shared-memory all-reduce with g++ the first time
        # it starts in an environment (half a minute, while the trial waits). Only its
        # tensor-parallel inference calls it; training never does, so it is not built.
        # (Not on a GPU: reading the table there probes about 30 op builders.)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # device_rank: DeepSpeed would take cuda:LOCAL_RANK, which is not the GPU Ray
    # gave this worker when a worker has more than one GPU, or a fraction of one.
    engine, _, _, _ = deepspeed.initialize(args=argparse.Namespace(device_rank=device.index or 0), model=model,
                                           model_parameters=model.parameters(), config=ds_config)

    # Selection and dev rows are read when first needed: training starts at once, whatever the data's size.
    select_rows = None
    sign = 1 if spec.higher_is_better else -1
    start_epoch, best = 0, {"metric": None, "epoch": -1}
    best_state = None
    best_weights = BestWeights(config["best_dir"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a retry of this trial: carry on from the last training state saved, as if never stopped
        with checkpoint.as_directory() as directory:
            engine.load_checkpoint(directory, tag="last_epoch")
            state = json.loads((Path(directory) / "state.json").read_text())
            start_epoch, best = state["epoch"] + 1, state["best"]
            set_random_state(torch.load(Path(directory) / f"random-state-{rank}.pt", weights_only=False), device)
        best_state = best_weights.load(best["epoch"])
    saved_best = best["epoch"]  # the best epoch the newest saved training state points to

    log = MlflowLog(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    if log:
        log.tags(environment_tags(device))
    timing = {"train_s": 0.0, "checkpoint_s": 0.0, "examples": 0, "tokens": 0}
    first_step = last_step = None
    loop_start = time.time()
    for epoch in range(start_epoch, epochs):
        engine.train()  # dropout on (from_pretrained gives a model in eval mode; selection leaves it so)
        losses, read = [], []
        for step, batch in enumerate(global_batches(rows.lengths, batch_size, settings["seed"], epoch)):
            crash_once(config, f"{epoch}:{step}")
            mine = worker_share(batch, rank, world)
            step_start = time.time()
            # A worker whose share of a last, short batch is empty still steps with the
            # others (their gradients are averaged): on a row of the batch, weighted 0.
            inputs = rows.tensors(mine if len(mine) else batch[:1], tokenizer.pad_token_id)
            mean = engine(**{k: v.to(engine.device) for k, v in inputs.items()}).loss
            # The global batch's loss is the mean over all its label tokens, whoever
            # reads them: this worker's part is its tokens' sum over the batch's count.
            # DeepSpeed averages gradients over the workers, hence x world.
            loss = mean * (int(rows.scored[mine].sum()) / int(rows.scored[batch].sum()))
            engine.backward(loss * world)
            engine.step()
            losses.append(loss.item())
            read.append([rows.ids[i] for i in mine])
            last_step = time.time()
            first_step = first_step or step_start
            timing["train_s"] += last_step - step_start
            timing["examples"] += len(mine)
            # A decoder-only model reads its answer as part of its input: count it once.
            timing["tokens"] += int(rows.lengths[mine].sum()) + (0 if decoder_only else int(rows.scored[mine].sum()))
        (loss_sum,) = all_reduce([sum(losses)], engine.device)
        batches = gather_steps(read)
        if select_rows is None:
            select_rows = config["select"].table(EVAL_COLUMNS, held_out=True, share=settings["selection_share"]
                                                 ).to_pylist()
        ids, predictions = evaluate_rows(engine.module, engine.device, tokenizer, select_rows, settings, 1,
                                         decoder_only, config["zero_stage"])
        metric = main_metric(task, [r["output"] for r in select_rows], predictions) if select_rows else 0.0
        saving = time.time()
        if best["metric"] is None or sign * metric > sign * best["metric"]:
            best, best_state = {"metric": metric, "epoch": epoch}, full_state(engine, config["zero_stage"])
            if rank == 0:
                best_weights.save(best_state, epoch)
        metrics = {"epoch": epoch, "train_loss": loss_sum / max(len(losses), 1), f"select_{spec.main_metric}": metric}
        if log:
            log.metrics(metrics, step=epoch)
            log.train_order(epoch, batches)
        last = epoch == epochs - 1
        if (epoch + 1) % settings["checkpoint_every"] == 0 or last:
            # The training state, every checkpoint_every epochs: what a retry resumes
            # from. The next epoch's order is a function of (seed, epoch), so the epoch
            # places the data; each worker's random state (dropout) goes with it. Ray
            # uploads it in the background and deletes the local copy.
            directory = tempfile.mkdtemp(prefix="lamp-grid-checkpoint-")
            engine.save_checkpoint(directory, tag="last_epoch")
            torch.save(random_state(device), Path(directory) / f"random-state-{rank}.pt")
            if rank == 0:
                (Path(directory) / "state.json").write_text(json.dumps({"epoch": epoch, "best": best}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
            if rank == 0:  # the state before this one may still be the newest committed
                best_weights.keep_only({saved_best, best["epoch"]})
            saved_best = best["epoch"]
        else:
            ray.train.report(metrics)
        timing["checkpoint_s"] += time.time() - saving
    loop_s = time.time() - loop_start

    if best_state is not None:
        load_state(engine, best_state, config["zero_stage"])
    dev_rows = config["dev"].table(EVAL_COLUMNS).to_pylist()
    decode_start = time.time()
    ids, predictions = evaluate_rows(engine.module, engine.device, tokenizer, dev_rows, settings,
                                     settings["beams"], decoder_only, config["zero_stage"])
    decode_s = time.time() - decode_start
    examples, tokens = all_reduce([timing["examples"], timing["tokens"]], engine.device)
    train_s, checkpoint_s = all_reduce([timing["train_s"], timing["checkpoint_s"]], engine.device, op="max")
    golds = [r["output"] for r in dev_rows]
    final = {f"dev_{k}": v for k, v in aggregate(task, golds, predictions).items()}
    final.update(best_epoch=best["epoch"], n_params=n_params, decode_examples_per_s=len(dev_rows) / decode_s)
    if train_s:  # a retry that resumed after the last epoch trained nothing
        final.update(train_s=train_s, train_examples_per_s=examples / train_s, train_tokens_per_s=tokens / train_s,
                     checkpoint_s=checkpoint_s, checkpoint_share=checkpoint_s / max(loop_s, 1e-9))
    if device.type == "cuda":
        (peak,) = all_reduce([torch.cuda.max_memory_allocated(device) / 1e9], engine.device, op="max")
        final["peak_gpu_memory_gb"] = peak
    if log:
        log.metrics(final)
        log.results(task, ids, golds, predictions, dev_rows, ds_config)
        if config["log_model"] and best_state is not None:
            best_model = model_ref.load()
            best_model.load_state_dict(best_state)
            log.model(best_model, tokenizer)
        if first_step:  # the fixed cost of a trial, around the training steps
            log.metrics({"trial_start_to_first_step_s": first_step - config["trial_start"],
                         "last_step_to_results_logged_s": time.time() - last_step,
                         "trial_s": time.time() - config["trial_start"]})
    ray.train.report(final)


def zero_shot_cell(config: dict) -> None:
    """Runs on every Train worker of a zero-shot cell: the model as it comes, for
    inference only. No DeepSpeed engine and no optimizer (an 11B model would need
    about 110 GB for AdamW's states); bf16 where native; a worker with several GPUs
    spreads the model over them."""
    import ray.train
    import ray.train.torch
    import torch

    device = worker_device(config)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object gather of the predictions uses the current device
    settings, task = config["settings"], config["settings"]["task"]
    rank = ray.train.get_context().get_world_rank()
    crash_once(config)
    model_ref, decoder_only = config["model"], config["model"].decoder_only
    tokenizer = load_tokenizer(model_ref)
    dtype = torch.bfloat16 if native_bf16(device) else torch.float32
    devices = ray.train.torch.get_devices()
    spread = device.type == "cuda" and len(devices) > 1
    placement = {"device_map": "auto", "max_memory": spread_over(devices, lambda d: torch.cuda.get_device_properties(
        d).total_memory)} if spread else {}
    model = model_ref.load(dtype=dtype, **placement)
    if not spread:
        model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    dev_rows = config["dev"].table(EVAL_COLUMNS).to_pylist()
    decode_start = time.time()
    ids, predictions = evaluate_rows(model, device, tokenizer, dev_rows, settings, settings["beams"],
                                     decoder_only, zero_stage=0)
    golds = [r["output"] for r in dev_rows]
    final = {f"dev_{k}": v for k, v in aggregate(task, golds, predictions).items()}
    final.update(n_params=n_params, decode_examples_per_s=len(dev_rows) / (time.time() - decode_start))
    if device.type == "cuda":
        (peak,) = all_reduce([torch.cuda.max_memory_allocated(device) / 1e9], device, op="max")
        final["peak_gpu_memory_gb"] = peak
    if rank == 0:
        log = MlflowLog(config["tracking_uri"], config["run_id"])
        log.tags(environment_tags(device))
        log.metrics(final)
        log.results(task, ids, golds, predictions, dev_rows, {})
    ray.train.report(final)


def spread_over(devices: list, total_memory) -> dict:
    """accelerate's max_memory for a model spread over this worker's GPUs alone: Ray
    shows each of a trial's workers the GPUs of all its workers on the node. Each
    holds weights up to 90% of its memory (total_memory(device), bytes); the rest is
    for decoding."""
    return {d.index: int(0.9 * total_memory(d)) for d in devices}


class BestWeights:
    """The best epoch's weights, in the trial's storage beside Ray's checkpoints:
    written only when the selection metric improves (not with every training
    state), read back by a retry. A file per epoch, so that the one the last saved
    training state points to is never overwritten before a newer state points
    elsewhere. `directory` is a local (shared) path or a URI."""

    def __init__(self, directory: str):
        from grid.storage import filesystem

        self.fs, self.root = filesystem(directory)

    def path(self, epoch: int) -> str:
        return f"{self.root}/epoch-{epoch}.pt"

    def save(self, state: dict, epoch: int) -> None:
        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.fs.create_dir(self.root, recursive=True)
        with self.fs.open_output_stream(f"{self.path(epoch)}.tmp") as out:
            out.write(buffer.getvalue())
        self.fs.move(f"{self.path(epoch)}.tmp", self.path(epoch))

    def load(self, epoch: int):
        import torch

        if epoch < 0:
            return None
        with self.fs.open_input_file(self.path(epoch)) as f:
            return torch.load(io.BytesIO(f.read()))

    def keep_only(self, epochs: set) -> None:
        """Removes every other epoch's file: those the saved training states no longer point to."""
        from pyarrow import fs

        keep = {f"epoch-{epoch}.pt" for epoch in epochs}
        for info in self.fs.get_file_info(fs.FileSelector(self.root, allow_not_found=True)):
            if info.base_name.startswith("epoch-") and info.base_name not in keep:
                self.fs.delete_file(info.path)


def crash_once(config: dict, position: str | None = None) -> None:
    """Fault injection for tests: with LAMP_GRID_CRASH_ONCE naming a directory, the
    first attempt of each trial dies (a marker file there records it): as it starts,
    or with LAMP_GRID_CRASH_AT=EPOCH:STEP, before that training step."""
    directory = os.environ.get("LAMP_GRID_CRASH_ONCE")
    if not directory or position != os.environ.get("LAMP_GRID_CRASH_AT"):
        return
    marker = Path(directory) / config["run_id"]
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        raise RuntimeError(f"LAMP_GRID_CRASH_ONCE: first attempt of run {config['run_id']} crashes on purpose"
                           + (f" at epoch:step {position}" if position else ""))


def portable_config(model) -> None:
    """Makes the model's config say whether its output embedding is its input
    embedding, as its weights have it, so that it loads alike under transformers 4
    and 5. transformers 5 sets T5's `tie_word_embeddings` to True whatever the
    checkpoint (and unties a head the checkpoint holds apart); transformers 4 reads
    True as: tie the head, and scale the decoder's outputs. A T5 whose head is its
    own (Flan-T5) is saved with False, which both read as untied and unscaled."""
    output = model.get_output_embeddings()
    model.config.tie_word_embeddings = output is not None and output.weight is model.get_input_embeddings().weight


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


# --- the Tune trial -----------------------------------------------------------------------


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


EVAL_COLUMNS = ["id", "prompt", "retrieved", "output", "prompt_ids"]


def fine_tune(grid_cell, plan, run_id: str, trial_id: str) -> None:
    """Fits the cell's Train run on its rendered splits (rendered before the grid
    started): train delivered by Ray Data to every worker, dev and selection rows read
    by each worker."""
    trial_start = time.time()
    from grid.storage import join

    cell, training = grid_cell.cell, grid_cell.training
    rendered = plan.renders[grid_cell.key]
    settings = {**asdict(training), "task": cell.task, "seed": cell.seed, "recipe": cell.recipe,
                "epochs": training.epochs_for(cell.task)}
    config = {"settings": settings, "model": plan.model, "run_id": run_id, "trial_start": trial_start,
              "tracking_uri": plan.tracking_uri, "zero_stage": plan.resources.zero_stage,
              "best_dir": join(plan.storage, trial_id, "best"), "log_model": plan.log_model,
              "dev": rendered["dev"], "threads": plan.resources.threads()}
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
    from grid.render import CellPrompts
    from grid.shards import load_examples
    from lamp.vote import vote

    cell, splits = grid_cell.cell, plan.shards[grid_cell.cell.task]
    prompts = CellPrompts(splits["dev"], cell, splits=splits)
    examples = load_examples(splits["dev"].examples)[: grid_cell.training.limit_dev or None]
    retrieved = [prompts.retrieved(row, e) for row, e in enumerate(examples)]
    predictions = [vote(cell.task, e.input, items) for e, items in zip(examples, retrieved)]
    golds = [e.output for e in examples]
    metrics = {f"dev_{k}": v for k, v in aggregate(cell.task, golds, predictions).items()}
    log = MlflowLog(plan.tracking_uri, run_id)
    log.metrics(metrics)
    rows = [{"id": e.id, "prompt": e.input, "retrieved": [i["id"] for i in items], "output": e.output}
            for e, items in zip(examples, retrieved)]
    log.results(cell.task, [e.id for e in examples], golds, predictions, rows, {})
    return metrics
