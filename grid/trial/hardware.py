"""What a Train worker decides about its hardware, from what Ray gave it: the device,
DeepSpeed's accelerator, the precision, the CPU threads, DeepSpeed's config and
engine, and sums over the trial's workers.

All of it is decided on the worker: the command may run on a head node with no
GPU at all, and nothing it knows about hardware holds here.
"""

import argparse
import os


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


def deepspeed_engine(model, device, ds_config: dict):
    """The model in a DeepSpeed engine on this worker's device. Called after
    worker_device(), as DeepSpeed picks its accelerator when first imported."""
    import deepspeed
    import torch

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
    return engine


def inference_model(model_ref, device):
    """The model as it comes (model_ref: a grid.model.ModelRef), for inference only:
    bf16 where native; a worker with several GPUs spreads it over them."""
    import ray.train.torch
    import torch

    dtype = torch.bfloat16 if native_bf16(device) else torch.float32
    devices = ray.train.torch.get_devices()
    spread = device.type == "cuda" and len(devices) > 1
    placement = {"device_map": "auto", "max_memory": spread_over(devices, lambda d: torch.cuda.get_device_properties(
        d).total_memory)} if spread else {}
    model = model_ref.load(dtype=dtype, **placement)
    if not spread:
        model.to(device)
    return model


def spread_over(devices: list, total_memory) -> dict:
    """accelerate's max_memory for a model spread over this worker's GPUs alone: Ray
    shows each of a trial's workers the GPUs of all its workers on the node. Each
    holds weights up to 90% of its memory (total_memory(device), bytes); the rest is
    for decoding."""
    return {d.index: int(0.9 * total_memory(d)) for d in devices}


def peak_gpu_memory(device) -> dict:
    """The most GPU memory any of the trial's workers held, in GB; nothing on a CPU."""
    import torch

    if device.type != "cuda":
        return {}
    (peak,) = all_reduce([torch.cuda.max_memory_allocated(device) / 1e9], device, op="max")
    return {"peak_gpu_memory_gb": peak}


def all_reduce(values: list, device, op: str = "sum") -> list:
    """Sums (or maxes) numbers over the trial's workers. The tensor lives on the
    worker's device: NCCL, Ray Train's backend on GPUs, refuses CPU tensors."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor.tolist()


def all_gather(value) -> list:
    """Every worker's `value`, in rank order, on every worker."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
