"""Checks that lamp-grid really trains on a GPU at the study's settings, and measures it.

Three grids go through the real entry point, grid.run.run_grid, on a local Ray
cluster it starts, on synthetic LaMP_2 data (lamp.synth) with models built here
from configs and saved as local Hugging Face folders (nothing is downloaded):

- a flan-t5-base-shaped T5 (random weights), two cells: retriever `none` and
  `BM25` with k = 4, fine-tuned at the study's settings (512-token prompts,
  batch 6, lr 5e-5, beam 4) with DeepSpeed ZeRO-2, bf16 where the GPU has it
  natively (the trial decides), for a few epochs on a slice of train;
- a GPT-2-small-shaped decoder, the same two cells;
- a flan-t5-xl-shaped (3B) T5, one zero-shot cell (epochs 0: decoding only);
- the flan-t5-base-shaped T5's `none` cell again with the training setting
  `deterministic` off, to measure what torch's deterministic kernels cost.

Per cell it prints FINISHED or the error, train examples/s and tokens/s, the
model FLOPs utilization (MFU = 6 x params x train tokens/s / the GPU's peak),
peak GPU memory and the share of the epoch loop spent checkpointing, all read
back from the cell's MLflow run; and writes them to OUT/gpu_check.json.

    .venv/bin/python checks/gpu_check.py            # on a machine with one NVIDIA GPU (under 8 minutes)
    .venv/bin/python checks/gpu_check.py --quick    # the same, less data and one epoch: under 5 minutes
    .venv/bin/python checks/gpu_check.py --cpu      # on CPU, tiny shapes, one training cell a model

Options: --out DIR (default bench/results, beside the benchmarks' results);
--workdir DIR (default a temporary folder, removed at the end: give one to keep
the MLflow store whose run ids the JSON names); --epochs N and --limit-train N
to shrink or grow the training cells.
"""

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from grid.run import Workdir, run_grid
from grid.spec import Resources, parse_grid
from grid.storage import building, put_in_place, write_atomically
from grid.tiny import train_tokenizer, training_texts
from lamp.synth import write_synthetic

# torch is imported in the functions that use it, after main() has decided
# whether the GPU is to be seen at all (--cpu hides it).

TASK = "LaMP_2"  # classification: short outputs, so decoding stays a small part of a cell

# Model shapes. On GPU, the study's models' sizes (flan-t5-base, GPT-2 small,
# flan-t5-xl), with the vocabulary of the tokenizer trained here; on CPU, tiny
# ones in the same three roles so that a test can run the whole script.
SHAPES = {
    "gpu": {
        "t5-base": ("t5", {"d_model": 768, "d_ff": 2048, "num_layers": 12, "num_decoder_layers": 12,
                           "num_heads": 12, "d_kv": 64}),
        "gpt2-small": ("gpt2", {"n_embd": 768, "n_layer": 12, "n_head": 12}),
        "t5-xl-3b": ("t5", {"d_model": 2048, "d_ff": 5120, "num_layers": 24, "num_decoder_layers": 24,
                            "num_heads": 32, "d_kv": 64}),
    },
    "cpu": {
        "t5-base": ("t5", {"d_model": 64, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
                           "d_kv": 16}),
        "gpt2-small": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4}),
        "t5-xl-3b": ("t5", {"d_model": 128, "d_ff": 256, "num_layers": 3, "num_decoder_layers": 3, "num_heads": 4,
                            "d_kv": 32}),
    },
}
TRAIN_AXES = [{"retriever": ["none", "BM25"], "k": [4]}]
ZERO_SHOT_AXES = [{"retriever": ["BM25"], "k": [4]}]
# The grids, in order: (label, model, axes, training overrides). The last repeats the
# first's `none` cell with torch's deterministic kernels off: what they cost.
GRIDS = [("t5-base", "t5-base", TRAIN_AXES, {}), ("gpt2-small", "gpt2-small", TRAIN_AXES, {}),
         ("t5-xl-3b", "t5-xl-3b", ZERO_SHOT_AXES, {"epochs": 0}),
         ("t5-base nondeterministic", "t5-base", [{"retriever": ["none"]}], {"deterministic": False})]
# --cpu (the test's run) trains one cell per model, each a minute of Ray Train start-up here:
# the t5 `none` cell the deterministic cost compares, and the decoder with profile items.
CPU_AXES = {"t5-base": [{"retriever": ["none"]}], "gpt2-small": [{"retriever": ["BM25"], "k": [4]}]}

# Data and schedule. GPU: the study's settings (Training's defaults: lr 5e-5,
# batch 6, beam 4, 512-token prompts) on a slice of train, sized to keep the
# five cells well under 8 minutes on one H100/H200 (an estimate until the first
# GPU run; --epochs and --limit-train adjust it). CPU: a handful of short
# examples, one epoch.
SETTINGS = {
    "gpu": {"users": 1000, "training": {"epochs": 2, "limit_train": 900, "limit_dev": 60}},
    # --quick: what fits a 15-minute GPU loan twice over, start-up included.
    "quick": {"users": 300, "training": {"epochs": 1, "limit_train": 240, "limit_dev": 24}},
    "cpu": {"users": 60, "training": {"epochs": 1, "limit_train": 48, "limit_dev": 12, "max_prompt_tokens": 64,
                                      "beams": 2}},
}

# What each cell's MLflow run should hold (the trial logs them, rank 0).
ALWAYS = ["n_params", "decode_examples_per_s"]
TRAINING = ["train_s", "train_examples_per_s", "train_tokens_per_s", "checkpoint_s", "checkpoint_share"]
GPU_ONLY = ["peak_gpu_memory_gb"]

# Peak dense FLOP/s (no 2:4 sparsity: NVIDIA's headline tensor numbers are the
# sparse ones, twice these) by the precision the trial trained in: bf16 on
# tensor cores, or plain fp32 (no TF32: torch leaves it off for matmuls). Matched
# as whole words in torch.cuda.get_device_name(), first match wins, so the more
# specific names come first ("H100 PCIe" before "H100", "A10G" and "A100" before
# "A10", "L40S" before "L4"). From NVIDIA's datasheets; the A10G (AWS's variant
# of the A10, no datasheet) measures about 70 TFLOP/s in bf16 matmuls, not the
# A10's 125. T4 and V100 have no native bf16: the trial trains fp32 there.
PEAK_FLOPS = [
    ("H200 NVL", {"bf16": 835e12, "fp32": 60e12}),
    ("H200", {"bf16": 989e12, "fp32": 67e12}),  # SXM
    ("H100 NVL", {"bf16": 835e12, "fp32": 60e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp32": 51e12}),
    ("H100", {"bf16": 989e12, "fp32": 67e12}),  # SXM: "NVIDIA H100 80GB HBM3"
    ("A100", {"bf16": 312e12, "fp32": 19.5e12}),
    ("A10G", {"bf16": 70e12, "fp32": 31.2e12}),
    ("A10", {"bf16": 125e12, "fp32": 31.2e12}),
    ("L40S", {"bf16": 362e12, "fp32": 91.6e12}),
    ("L40", {"bf16": 181e12, "fp32": 90.5e12}),
    ("L4", {"bf16": 121e12, "fp32": 30.3e12}),
    ("T4", {"fp32": 8.1e12}),  # fp16 tensor cores: 65e12, unused by the trial
    ("V100-PCIE", {"fp32": 14e12}),  # fp16: 112e12
    ("V100", {"fp32": 15.7e12}),  # SXM2; fp16: 125e12
]


def peak_flops(gpu: str, precision: str) -> float | None:
    for name, peaks in PEAK_FLOPS:
        if re.search(rf"\b{re.escape(name)}\b", gpu, re.IGNORECASE):
            return peaks.get(precision)
    return None


# --- models ----------------------------------------------------------------------------------


def build_model(kind: str, shape: dict, tokenizer, folder: Path, dtype) -> int:
    """A randomly initialized model saved with the tokenizer as a Hugging Face folder
    (written atomically, kept if already there); returns its parameter count."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if kind == "t5":  # flan-t5's other settings: gated-GELU feed-forward, untied head
        config = T5Config(vocab_size=len(tokenizer), feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                          decoder_start_token_id=tokenizer.pad_token_id, **ids, **shape)
        model_class = T5ForConditionalGeneration
    else:
        config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id, **ids, **shape)
        model_class = GPT2LMHeadModel
    if (folder / "built.json").exists():  # by an earlier run in this --workdir
        return json.loads((folder / "built.json").read_text())["params"]
    torch.manual_seed(0)
    # On the GPU when there is one: random init of 3B parameters on CPU takes a while.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = model_class(config)
        if kind == "t5":
            # transformers 5 ties T5's head to its embeddings whatever the config says
            # (tie_word_embeddings=False only turns off the decoder's output scaling); flan-t5's
            # checkpoints hold two different matrices, which from_pretrained keeps apart. So here.
            model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight).normal_())
            model.config.tie_word_embeddings = False
    params = sum(p.numel() for p in model.parameters())
    with building(folder) as tmp:
        model.to(dtype).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "built.json").write_text(json.dumps({"params": params}))
        put_in_place(tmp, folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the trials' workers are other processes: give it back
    return params


# --- reading a cell back -------------------------------------------------------------------


def trial_errors(storage: str, grid: str) -> dict:
    """Tune's error.txt of each failed trial of the grid, by cell index (run names a
    trial's folder `cell-N-<trial id>`), last line first."""
    errors = {}
    for path in Path(storage).glob(f"{grid}-*/*/error.txt"):
        found = re.search(r"^cell-(\d+)-", path.parent.name)
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if found and lines:
            errors[int(found.group(1))] = lines[-1].strip()
    return errors


def precision_of(client, run_id: str) -> str | None:
    """bf16 or fp32, as the trial's DeepSpeed config (an artifact of the run) says."""
    try:
        with tempfile.TemporaryDirectory() as directory:
            path = client.download_artifacts(run_id, "deepspeed_config.json", directory)
            config = json.loads(Path(path).read_text())
    except (OSError, MlflowException, ValueError):  # no artifact (a failed cell): unknown
        return None
    return ("bf16" if config.get("bf16", {}).get("enabled") else "fp32") if config else None


def short_name(label: str, grid_cell) -> str:
    c = grid_cell.cell
    return f"{label} {c.task} {c.retriever}" + (f" k={c.k}" if c.retriever != "none" else "") + (
        " zero-shot" if grid_cell.training.epochs == 0 else "")


def cell_report(client, row, label: str, trains: bool, gpu: str | None, error: str | None) -> dict:
    run = client.get_run(row.run_id) if row.run_id else None
    metrics = dict(run.data.metrics) if run else {}
    expected = ALWAYS + (TRAINING if trains else []) + (GPU_ONLY if gpu else [])
    precision = precision_of(client, row.run_id) if trains and row.run_id else None
    mfu = None
    peak = peak_flops(gpu, precision) if gpu and precision else None
    if peak and metrics.get("n_params") and metrics.get("train_tokens_per_s"):
        # One worker per trial, so one GPU's peak. For a T5 this overstates MFU:
        # a prompt token passes only the encoder, a label token only the decoder.
        mfu = 6 * metrics["n_params"] * metrics["train_tokens_per_s"] / peak
    status = row.status
    return {"model": label, "cell": short_name(label, row.cell), "key": row.cell.key, "status": status,
            "error": error if status != "FINISHED" else None, "trains": trains, "run_id": row.run_id,
            "precision": precision, "peak_flops": peak, "mfu": mfu, "metrics": metrics,
            "missing_metrics": [m for m in expected if m not in metrics] if status == "FINISHED" else []}


# --- printing --------------------------------------------------------------------------------


def number(value, fmt: str, scale: float = 1) -> str:
    return "n/a" if value is None else format(value * scale, fmt)


def print_cell(c: dict, on_gpu: bool) -> None:
    m = c["metrics"]
    dev = ", ".join(f"{k} {v:.3f}" for k, v in sorted(m.items()) if k.startswith("dev_"))
    head = f"{c['cell']:<35} {c['status']}"
    if c["status"] != "FINISHED":
        print(f"{head}: {c['error'] or 'no error recorded'}")
        return
    # MFU and GPU memory mean nothing on CPU: left out there, not shown as missing.
    gpu = f"  peak GPU mem {number(m.get('peak_gpu_memory_gb'), '.1f')} GB" if on_gpu else ""
    if c["trains"]:
        per_example = (m["train_tokens_per_s"] / m["train_examples_per_s"]
                       if m.get("train_tokens_per_s") and m.get("train_examples_per_s") else None)
        mfu = f"  MFU {number(c['mfu'], '.1%')}" if on_gpu else ""
        print(f"{head}  {number(m.get('train_examples_per_s'), '.1f')} ex/s  "
              f"{number(m.get('train_tokens_per_s'), ',.0f')} tok/s ({number(per_example, '.0f')} tok/ex, "
              f"{c['precision'] or 'n/a'}){mfu}{gpu}  checkpoint {number(m.get('checkpoint_share'), '.0%')} "
              f"of the epoch loop  {dev}")
    else:
        print(f"{head}  decode {number(m.get('decode_examples_per_s'), '.1f')} ex/s{gpu}  {dev}")
    if c["missing_metrics"]:
        print(f"{'':<35} missing from its MLflow run: {', '.join(c['missing_metrics'])}")


# --- the check ---------------------------------------------------------------------------------


def check_model(label: str, model: str, axes: list, overrides: dict, tokenizer, work: Workdir, mode: str,
                gpu: str | None, training: dict, resources: Resources, users: int, stamp: str) -> list:
    """Builds the model (once), runs its grid through run_grid, and reads each cell back."""
    import torch

    kind, shape = SHAPES["cpu" if mode == "cpu" else "gpu"][model]
    trains = overrides.get("epochs") != 0
    # The zero-shot model is only read, in bf16 on GPUs: saved so, half the disk and load time.
    folder = work.root / "models" / f"{model}-{mode}"
    params = build_model(kind, shape, tokenizer, folder, torch.float32 if trains or not gpu else torch.bfloat16)
    print(f"\n== {label}: {params / 1e6:.1f}M parameters, {folder}")
    # A grid name of its own per run: run_grid skips cells already FINISHED under
    # the same name, and a check must measure, not reuse.
    name = f"gpu-check-{label.replace(' ', '-')}-{stamp}"
    spec = parse_grid({"name": name, "tasks": [TASK], "model": str(folder), "axes": axes,
                       "training": {**training, **overrides}}, name)
    try:
        # No retries: a check reports the first failure instead of spending the time twice more.
        rows = run_grid(spec, str(work.data), work.root, resources=resources, retries=0, users=users)
    except Exception as error:  # noqa: BLE001 (whatever stops a grid, the check reports it and goes on)
        return [{"model": label, "cell": short_name(label, c), "key": c.key, "status": "FAILED",
                 "error": f"{type(error).__name__}: {error}", "trains": trains, "metrics": {},
                 "missing_metrics": [], "params_built": params} for c in spec.cells()]
    errors = trial_errors(work.storage, name)
    client = MlflowClient(work.tracking_uri)  # the store run_grid used (its default)
    return [{**cell_report(client, row, label, trains, gpu, errors.get(index)), "params_built": params}
            for index, row in enumerate(rows)]


def deterministic_cost(cells: list) -> dict | None:
    """Train examples/s of the t5-base `none` cell with torch's deterministic kernels (the
    default) and without; None where either did not finish."""
    def speed(label: str):
        found = [c["metrics"].get("train_examples_per_s") for c in cells
                 if c["model"] == label and c["key"].split("/")[2] == "none" and c["status"] == "FINISHED"]
        return found[0] if found and found[0] else None

    on, off = speed("t5-base"), speed("t5-base nondeterministic")
    return {"on_examples_per_s": on, "off_examples_per_s": off, "ratio_on_to_off": on / off} if on and off else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="CPU only, tiny shapes (for the test)")
    parser.add_argument("--quick", action="store_true", help="less data and one epoch: under 5 minutes on one GPU")
    parser.add_argument("--out", default="bench/results", help="folder for gpu_check.json")
    parser.add_argument("--workdir", help="lamp-grid work directory (default: a temporary one, removed after)")
    parser.add_argument("--epochs", type=int, help="epochs of the training cells")
    parser.add_argument("--limit-train", type=int, help="train examples of the training cells")
    args = parser.parse_args()
    if args.cpu:  # CPU even on a GPU machine: hidden before torch or Ray look for one
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    started = time.time()
    mode = "cpu" if args.cpu else ("quick" if args.quick else "gpu")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if mode != "cpu" and gpu is None:
        print("no CUDA GPU here: run with --cpu for the CPU version", file=sys.stderr)
        return 2
    settings = SETTINGS[mode]
    overrides = {"epochs": args.epochs, "limit_train": args.limit_train}
    training = {**settings["training"], **{k: v for k, v in overrides.items() if v is not None}}
    work = Workdir(Path(args.workdir or tempfile.mkdtemp(prefix="lamp-gpu-check-")).resolve())
    resources = Resources(gpus_per_worker=1 if gpu else 0, zero_stage=2)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cells, timings = [], {}
    try:
        write_synthetic(work.data, [TASK], users=settings["users"], seed=0)
        tokenizer = train_tokenizer(training_texts(work.data, [TASK]))
        for label, model, axes, grid_overrides in GRIDS:
            grid_start = time.time()
            axes = CPU_AXES.get(label, axes) if mode == "cpu" else axes
            cells += check_model(label, model, axes, grid_overrides, tokenizer, work, mode, gpu, training, resources,
                                 settings["users"], stamp)
            timings[label] = round(time.time() - grid_start, 1)
    finally:
        import ray

        ray.shutdown()
        if not args.workdir:
            shutil.rmtree(work.root, ignore_errors=True)

    print(f"\n== {gpu or 'CPU'}: {len(cells)} cells in {time.time() - started:.0f} s")
    for cell in cells:
        print_cell(cell, gpu is not None)
    missing = sorted({m for c in cells for m in c["missing_metrics"]})
    cost = deterministic_cost(cells)
    if cost:
        print(f"deterministic kernels: {cost['on_examples_per_s']:.1f} train ex/s on, {cost['off_examples_per_s']:.1f}"
              f" off ({cost['ratio_on_to_off']:.2f}x)")
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"gpu": gpu or "CPU", "cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "command": shlex.join(["python", *sys.argv]),
        "mode": mode, "task": TASK, "users": settings["users"], "training": training,
        "resources": {"workers_per_trial": resources.workers_per_trial, "gpus_per_worker": resources.gpus_per_worker,
                      "zero_stage": resources.zero_stage},
        "shapes": {label: {"kind": kind, **shape} for label, (kind, shape) in SHAPES[
            "cpu" if mode == "cpu" else "gpu"].items()},
        "wall_s": round(time.time() - started, 1), "grid_wall_s": timings, "deterministic_cost": cost,
        "missing_metrics": missing, "cells": cells,
    }
    out = Path(args.out) / "gpu_check.json"
    write_atomically(out, (json.dumps(result, indent=1) + "\n").encode())
    print(f"wrote {out}" + (f"; metrics missing from the trials' MLflow runs: {', '.join(missing)}"
                            if missing else ""))
    return 0 if cells and all(c["status"] == "FINISHED" for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
