"""Benchmark: Contriever's embedding pass (grid/embed.py) on this machine's CPUs.

With the small BERT encoder of grid/tiny.py (hidden 32, 2 layers; facebook/contriever
cannot be downloaded here), on `synth --like-lamp --scale F` data for LaMP_2 and LaMP_4:

1. throughput: LaMP_4's dev split's items embedded (whole items) by one actor,
   then by two: items per second over the pass (the actors' start and the
   encoder's loading included), and each actor's peak RSS. An untimed pass over
   its first rows comes first: Ray's first workers start and import torch
   from a cold disk, which the first timed pass would otherwise pay alone;
2. `prepare` of the Contriever ranking (whole items: what cells without `decouple`
   read) for each task, from a cold cache: seconds, the driver's peak RSS and the
   embedding and ranking actors' peak RSS.

    python bench/embed_bench.py [--scale 0.05] [--encoder FOLDER|HUB_ID] [--out bench/results/embed.json]

--encoder runs it with another encoder (facebook/contriever on a GPU machine, say).
"""

import argparse
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from memory_peaks import ProcessPeaks, peak_mb, reset_peak  # bench/: scripts run from bench/
from report import write_result

from grid.embed import resolve_encoder, write_embeddings
from grid.examples import write_examples
from grid.shards import prepare
from grid.tiny import TINY_ENCODER_CONFIG, build_tiny_encoder
from lamp.data import find_splits
from lamp.synth import write_like_lamp

TASKS = ("LaMP_2", "LaMP_4")


def throughput(examples: Path, encoder, actors: int, out: Path) -> dict:
    """One embedding pass over `examples` by `actors` actors: items/s and peak RSS per actor."""
    items = sum(len(profile) for profile in pq.read_table(examples, columns=["profile"]).column("profile").to_pylist())
    peaks = ProcessPeaks(b"EmbedExamples")
    peaks.start()
    start = time.perf_counter()
    write_embeddings("LaMP_4", str(examples), {False: out}, encoder, actors, log=lambda _: None)
    seconds = time.perf_counter() - start
    memory = peaks.stop()
    return {"actors": actors, "items": items, "queries": pq.read_metadata(examples).num_rows,
            "s": round(seconds, 1), "items_per_s": round(items / seconds, 1),
            "actor_peak_rss_mb": memory["max_mb"], "actor_processes": memory["processes"]}


def prepare_task(data: Path, cache: Path, task: str, encoder: str) -> dict:
    """A cold `prepare` of one task's Contriever ranking: seconds and peak memory."""
    reset_peak()
    embedders, rankers = ProcessPeaks(b"EmbedExamples"), ProcessPeaks(b"RankExamples")
    embedders.start()
    rankers.start()
    start = time.perf_counter()
    shards = prepare(data, cache, tasks=[task], retrievers=["Contriever"], by_input=False,
                     retriever_model=encoder, log=lambda _: None)
    seconds = time.perf_counter() - start
    rows = sum(pq.read_metadata(s.examples).num_rows for s in shards)
    items = sum(len(p) for s in shards
                for p in pq.read_table(s.examples, columns=["profile"]).column("profile").to_pylist())
    return {"examples": rows, "items": items, "s": round(seconds, 1), "driver_peak_mb": peak_mb(),
            "embedder_peak_rss_mb": embedders.stop()["max_mb"], "ranker_peak_rss_mb": rankers.stop()["max_mb"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=0.05, help="of LaMP's sizes (synth --like-lamp --scale)")
    parser.add_argument("--encoder", help="an encoder folder or hub id (default: the small BERT, built from the data)")
    parser.add_argument("--out", default="bench/results/embed.json")
    args = parser.parse_args()
    import ray

    work = Path(tempfile.mkdtemp(prefix="lamp-embed-bench-"))
    try:
        write_like_lamp(work / "data", TASKS, scale=args.scale, seed=0)
        encoder = resolve_encoder(args.encoder or str(build_tiny_encoder(work / "data", TASKS, work / "encoder")))
        ray.init(logging_level=logging.WARNING)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        (dev,) = [s for s in find_splits(work / "data", ["LaMP_4"]) if s.split == "dev"]
        write_examples(dev, work / "dev.parquet")
        pq.write_table(pq.read_table(work / "dev.parquet").slice(0, 16), work / "warm-up.parquet")
        throughput(work / "warm-up.parquet", encoder, 2, work / "warm-up")
        result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {cpus} CPUs for Ray, no GPU",
                  # The machine is shared: how busy it was says how much the timings may be off.
                  "load_average_at_start": round(os.getloadavg()[0], 1),
                  "scale": args.scale,
                  "encoder": {"name": args.encoder} if args.encoder else {"kind": "BERT", **TINY_ENCODER_CONFIG},
                  "throughput": [throughput(work / "dev.parquet", encoder, actors, work / f"embedded-{actors}")
                                 for actors in (1, 2)],
                  "prepare": {task: prepare_task(work / "data", work / "cache", task, encoder.name) for task in TASKS}}
        one, two = result["throughput"]
        result["two_actors_speedup"] = round(two["items_per_s"] / one["items_per_s"], 2)
        write_result(result, args.out)
    finally:
        ray.shutdown()  # before its files go: no actor outlives them
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
