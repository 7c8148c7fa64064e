"""Benchmark: the study's per-cell preprocessing against `prepare` once + render.

On a synthetic LaMP_4-shaped set (profile about 287 items), measured side by
side in one run:
- the study's way: for each of 48 cells (4 ablations x 4 orders x 3 k), rank
  every example with rank_bm25, render, and tokenize padded to 512;
- ours: `prepare` once (BM25 rankings as Parquet shards, on local Ray), then
  render the 48 cells from the shards.
Also: examples ranked per second, our vectorized BM25 against a plain
rank_bm25 loop on the same data.

    python bench/prepare_bench.py [--users 2500] [--profile-size 287] [--out bench/results/prepare.json]
"""

import argparse
import itertools
import platform
import shutil
import tempfile
import time
from pathlib import Path

from rank_bm25 import BM25Okapi
from report import write_result  # bench/report.py: scripts run from bench/
from transformers import AutoTokenizer

from grid.render import CellPrompts
from grid.examples import load_examples
from grid.shards import prepare
from grid.tiny import build_tiny_model
from lamp.cell import Cell
from lamp.data import find_splits, read_examples
from lamp.prompts import TokenCounter, render_prompt
from lamp.retrieval import bm25_ranking, document_text, drop_query_items, extract_query
from lamp.synth import write_synthetic
from lamp.tasks import get_task

TASK = "LaMP_4"
ABLATIONS = ("both", "only_output", "decouple", "only_input")
ORDERS = ("start", "end", "middle", "random")
KS = (1, 4, 16)


def study_cell(examples, cell, tokenizer, counter):
    """One cell the study's way: rank_bm25 per example, render, pad to 512."""
    spec = get_task(TASK)
    prompts = []
    for example in examples:
        query = extract_query(TASK, example.input)
        items = drop_query_items(TASK, example.profile, example.input)
        corpus = [document_text(TASK, item, cell.ablation == "decouple").split() for item in items]
        scores = BM25Okapi(corpus).get_scores(query.split())
        order = sorted(range(len(items)), key=lambda i: -scores[i])
        top = [items[i] for i in order[: cell.k]]
        prompts.append(render_prompt(spec, example.input, top, cell.ablation, cell.order, cell.seed,
                                     example.id, counter).text)
    tokenizer(prompts, padding="max_length", max_length=512, truncation=True)
    return prompts


def ours(shards: list, cells: list, tokenizer) -> tuple:
    """Every cell rendered from the shards `prepare` wrote: ({(cell, split): prompts}, seconds)."""
    start = time.perf_counter()
    counter = TokenCounter(tokenizer, remember=1 << 20)  # one memory for the whole grid
    loaded = {s.split: load_examples(s.examples) for s in shards}
    prompts = {}
    for cell in cells:
        for s in shards:
            rows = list(range(len(loaded[s.split])))
            prompts[cell, s.split] = [p.text for p in CellPrompts(s, cell).render(rows, loaded[s.split], counter)]
    return prompts, time.perf_counter() - start


def theirs(examples: dict, cells: list, tokenizer) -> tuple:
    """Every cell the study's way, from scratch: ({(cell, split): prompts}, seconds)."""
    start = time.perf_counter()
    prompts = {}
    for i, cell in enumerate(cells):
        for split, exs in examples.items():
            # A fresh tokenizer memory per cell: the study recomputed everything per run.
            prompts[cell, split] = study_cell(exs, cell, tokenizer, TokenCounter(tokenizer))
        print(f"  study's way: {i + 1}/{len(cells)} cells, {time.perf_counter() - start:.0f} s", flush=True)
    return prompts, time.perf_counter() - start


def ranking_seconds(examples: list) -> tuple:
    """Seconds to rank every example: (a rank_bm25 loop, our vectorized BM25)."""
    start = time.perf_counter()
    for e in examples:
        query = extract_query(TASK, e.input)
        items = drop_query_items(TASK, e.profile, e.input)
        BM25Okapi([document_text(TASK, item).split() for item in items]).get_scores(query.split())
    loop_s = time.perf_counter() - start
    start = time.perf_counter()
    for e in examples:
        query = extract_query(TASK, e.input)
        bm25_ranking(TASK, query, drop_query_items(TASK, e.profile, e.input))
    return loop_s, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=2500)
    parser.add_argument("--profile-size", type=int, default=287)
    parser.add_argument("--out", default="bench/results/prepare.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lamp-bench-"))
    try:
        write_synthetic(work / "data", [TASK], users=args.users, seed=0, profile_size=args.profile_size)
        examples = {s.split: list(read_examples(s)) for s in find_splits(work / "data", [TASK])}
        tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(work / "data", [TASK], work / "tiny"))
        cells = [Cell(TASK, "BM25", k, ablation, order)
                 for ablation, order, k in itertools.product(ABLATIONS, ORDERS, KS)]
        flat = [e for v in examples.values() for e in v]
        n_examples = len(flat)
        profile = sum(len(e.profile) for e in flat) / n_examples
        input_words = sum(len(extract_query(TASK, e.input).split()) for e in flat)
        print(f"{n_examples} examples, mean profile {profile:.0f} items, "
              f"mean article {input_words / n_examples:.0f} words; {len(cells)} cells")

        start = time.perf_counter()
        shards = prepare(work / "data", work / "cache", retrievers=["BM25"], seeds=[0])
        prepare_s = time.perf_counter() - start
        our_prompts, render_s = ours(shards, cells, tokenizer)
        print(f"ours: prepare {prepare_s:.1f} s + render {len(cells)} cells {render_s:.1f} s")
        their_prompts, study_s = theirs(examples, cells, tokenizer)
        assert our_prompts == their_prompts, "both ways must give the same prompts"
        loop_s, ours_rank_s = ranking_seconds(flat)

        result = {
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
            "examples": n_examples, "mean_profile": round(profile, 1), "cells": len(cells),
            "study_way_s": round(study_s, 1), "ours_prepare_s": round(prepare_s, 1),
            "ours_render_s": round(render_s, 1), "ours_total_s": round(prepare_s + render_s, 1),
            "speedup": round(study_s / (prepare_s + render_s), 1),
            "rank_bm25_loop_examples_per_s": round(n_examples / loop_s, 1),
            "vectorized_bm25_examples_per_s": round(n_examples / ours_rank_s, 1),
            "prepare_examples_ranked_per_s": round(2 * n_examples / prepare_s, 1),
        }
        write_result(result, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
