"""Benchmark: training tokens per second, length batching with dynamic padding
(grid/order.py's training order) against padding every input to 512 (the study's way).

Same tiny T5, same prompts, same batch size, measured in one run; the
throughput counts real (non-pad) tokens. The prompts are a grid's worth of
LaMP-shaped lengths: synthetic LaMP_2 and LaMP_4 train prompts of the cells
none, BM25 k=1 and BM25 k=4, shuffled together.

    python bench/padding_bench.py [--batches 30] [--batch-size 8] [--users 200]
"""

import argparse
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch
from report import write_result  # bench/report.py: scripts run from bench/
from transformers import AutoModelForSeq2SeqLM

from grid.model import ModelRef
from grid.order import TrainRows, global_batches, pad
from grid.render import cell_table
from grid.shards import prepare
from grid.tiny import build_tiny_model
from lamp.cell import Cell
from lamp.synth import write_synthetic


def train_steps(model, batches) -> tuple:
    """(real tokens, seconds) for one optimizer step per batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens, start = 0, time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tokens += int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())
    return tokens, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--users", type=int, default=200, help="synthetic users per task")
    parser.add_argument("--out", default="bench/results/padding.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="lamp-pad-"))
    try:
        tasks = ["LaMP_2", "LaMP_4"]
        write_synthetic(work / "data", tasks, users=args.users, seed=0, profile_size=60)
        model_path = build_tiny_model(work / "data", tasks, work / "tiny")
        tiny = ModelRef.named(str(model_path)).resolved()
        examples = []
        for shards in prepare(work / "data", work / "cache", retrievers=["BM25"]):
            if shards.split != "train":
                continue
            for cell in (Cell(shards.task), Cell(shards.task, "BM25", 1), Cell(shards.task, "BM25", 4)):
                table = cell_table(shards, cell, tiny)
                examples += zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist())
        random.Random(0).shuffle(examples)
        # Prompts over 512 tokens would be cut by the study's way; compare on those that fit.
        examples = [e for e in examples if len(e[0]) <= 512][: args.batches * args.batch_size]
        n = len(examples)
        chunk = {"input_ids": [e[0] for e in examples], "labels": [e[1] for e in examples]}
        lengths = [len(x) for x in chunk["input_ids"]]
        # As the trainer does: an epoch's batches, grouped by length, each padded to its own longest.
        rows = TrainRows([pa.table({"row": list(range(n)), "id": [str(i) for i in range(n)], **chunk})])
        dynamic = [rows.tensors(batch, 0) for batch in global_batches(rows.lengths, args.batch_size, 0, 0)]
        order = list(range(n))
        random.Random(0).shuffle(order)
        padded = []
        for start in range(0, n, args.batch_size):
            picked = order[start:start + args.batch_size]
            inputs = [chunk["input_ids"][i] + [0] * (512 - len(chunk["input_ids"][i])) for i in picked]
            padded.append({"input_ids": torch.tensor(inputs),
                           "attention_mask": torch.tensor([[int(t != 0) for t in row] for row in inputs]),
                           "labels": pad([chunk["labels"][i] for i in picked], -100)})
        model = AutoModelForSeq2SeqLM.from_pretrained(model_path)
        train_steps(model, dynamic[:3])  # warm up
        dyn_tokens, dyn_s = train_steps(model, dynamic)
        pad_tokens, pad_s = train_steps(model, padded)
        result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                  "batches": len(dynamic), "batch_size": args.batch_size,
                  "prompt_tokens_mean": round(sum(lengths) / n, 1), "prompt_tokens_max": max(lengths),
                  "dynamic_tokens_per_s": round(dyn_tokens / dyn_s, 1),
                  "pad_to_512_tokens_per_s": round(pad_tokens / pad_s, 1),
                  "speedup": round((dyn_tokens / dyn_s) / (pad_tokens / pad_s), 2)}
        assert dyn_tokens == pad_tokens, "both ways train on the same real tokens"
        write_result(result, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
