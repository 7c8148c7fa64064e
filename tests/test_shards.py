"""Precomputed shards: the rankings are those ranked in memory, the cache hits,
misses and invalidates, a killed prepare leaves nothing that looks complete, and
the worker count does not change a shard."""

import json
import os
import random
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grid.pipeline import ACTOR_BASE
from grid.examples import example_record, examples_schema, load_examples, write_examples
from grid.shards import RankExamples, parquet_pool, prepare, ranker_plan
from lamp.data import Example, find_splits
from lamp.retrieval import ItemPool, rank
from lamp.synth import write_synthetic
from lamp.tasks import get_task
from tests.cli import ROOT, run_cli

RETRIEVERS = ["BM25", "Random", "Full_Random", "RanBM25"]


@pytest.fixture(scope="module")
def shards(data, tmp_path_factory, ray_local):
    cache = tmp_path_factory.mktemp("cache")
    return cache, prepare(data, cache, retrievers=RETRIEVERS, seeds=[0, 1], log=lambda _: None)


def dev(shard_list):
    (split,) = [s for s in shard_list if s.split == "dev"]
    return split


def test_other_user_rankings_are_those_ranked_in_memory(shards):
    # The rankers draw from a pool read from examples.parquet; `render` and cells
    # draw from ItemPool(examples): the same items, in the same places.
    _, shard_list = shards
    for split in shard_list:
        examples = load_examples(split.examples)
        pool = ItemPool(examples)
        places = {id(item): (row, pos) for row, example in enumerate(examples)
                  for pos, item in enumerate(example.profile)}
        for name in ("Full_Random", "RanBM25", "RanBM25_input"):
            for seed in (0, 1):
                stored = pq.read_table(split.ranking(name, seed)).sort_by("row").to_pylist()
                assert [r["row"] for r in stored] == list(range(len(examples)))
                for example, r in zip(examples, stored):
                    ranking = rank("LaMP_2", example, name.removesuffix("_input"), seed=seed, pool=pool,
                                   by_input=name.endswith("_input"))
                    assert list(zip(r["cand_row"], r["cand_pos"])) == [places[id(i)] for i in ranking.items]
                    assert r["score"] == (None if ranking.scores is None else ranking.scores.tolist())
                    assert ranking.items


def write_examples_file(path, examples, task="LaMP_2", rows_per_group=3):
    fields = list(get_task(task).item_fields)
    with pq.ParquetWriter(path, examples_schema(task)) as writer:
        for start in range(0, len(examples), rows_per_group):
            writer.write_table(pa.Table.from_pylist([example_record(row, example, fields) for row, example in
                                                     enumerate(examples) if start <= row < start + rows_per_group],
                                                    examples_schema(task)))


def test_a_pool_read_from_parquet_draws_what_the_examples_in_memory_draw(tmp_path):
    rng = random.Random(3)
    examples = []
    for i in range(40):  # time-based: users with several examples, repeating items, out of order
        user = rng.choice(["u3", "u1", "u20", "u2", "ü"])
        profile = [{"id": str(rng.randint(0, 60)), "description": f"{user} {rng.randint(0, 9)} words", "tag": "t",
                    **({"date": "2020"} if rng.random() < 0.5 else {})} for _ in range(rng.randint(0, 12))]
        examples.append(Example(id=f"q{i}", user=user, input="Which tag does this movie relate to among the "
                                "following tags? description: a b", profile=profile, output="t"))
    path = tmp_path / "examples.parquet"
    write_examples_file(path, examples)
    assert pq.ParquetFile(path).metadata.num_row_groups > 5
    loaded = load_examples(path)
    in_memory, light = ItemPool(loaded), parquet_pool(path)
    assert light.span == in_memory.span and light.mean_profile_size == in_memory.mean_profile_size
    assert light.row.tolist() == in_memory.row.tolist() and light.pos.tolist() == in_memory.pos.tolist()
    for user in ["u3", "u1", "ü", "nobody"]:
        for n in (1, 9, 1000):
            for seed in (0, 1):
                drawn = light.sample(user, n, np.random.default_rng(seed))
                assert drawn == in_memory.sample(user, n, np.random.default_rng(seed)) and drawn


def test_a_ranker_holds_no_split_and_its_pool_is_small(tmp_path):
    write_synthetic(tmp_path / "data", tasks=["LaMP_2"], users=300, seed=1)
    path = tmp_path / "examples.parquet"
    (train,) = [s for s in find_splits(tmp_path / "data", ["LaMP_2"]) if s.split == "train"]
    write_examples(train, path)
    tracemalloc.start()
    try:
        examples = load_examples(path)
        split_bytes = tracemalloc.get_traced_memory()[0]
        del examples
        before = tracemalloc.get_traced_memory()[0]
        ranker = RankExamples("LaMP_2", str(path), [("Full_Random", 0), ("RanBM25", 0), ("BM25", None)])
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # What the split takes in Python against what a ranker keeps of it: ids and places.
    assert held < split_bytes / 10, (held, split_bytes)
    assert ranker.pool.nbytes == 12 * len(ranker.pool) < split_bytes / 20
    assert not [name for name, value in vars(ranker).items() if isinstance(value, list) and value
                and isinstance(value[0], Example)]
    batch = pq.read_table(path).slice(100, 70)
    out = ranker(batch)
    assert out["row"] == list(range(100, 170)) and all(out["RanBM25/0/cand_row"])
    assert not ranker.places and ranker.store is None  # nothing of the batch stays


def test_rankers_ask_for_the_memory_they_hold(shards):
    _, shard_list = shards
    (train,) = [s for s in shard_list if s.split == "train"]
    plain_batch, plain = ranker_plan(train.examples, [("BM25", None)], workers=2)
    pooled_batch, pooled = ranker_plan(train.examples, [("BM25", None), ("RanBM25", 0)], workers=2)
    assert plain_batch == 64 and ACTOR_BASE < plain < pooled < ACTOR_BASE + (64 << 20)
    assert pooled_batch == 24  # a worker's share of the 48 examples: drawing them all is a few MB


def test_second_prepare_is_a_no_op_and_a_new_seed_only_adds_its_rankings(data, shards):
    cache, _ = shards
    messages = []
    prepare(data, cache, retrievers=RETRIEVERS, seeds=[0, 1], log=messages.append)
    assert messages[-1].startswith("prepare: 0 shard(s) computed") and "nothing to do" in messages[-1]
    before = set(p.name for p in cache.rglob("*") if p.is_dir())
    messages = []
    prepare(data, cache, retrievers=["Random"], seeds=[2], log=messages.append)
    added = set(p.name for p in cache.rglob("*") if p.is_dir()) - before
    assert sorted(name.split("-")[0] + "-" + name.split("-")[1] for name in added) == \
        ["Random-seed2", "Random-seed2"]  # train and dev, nothing else recomputed
    assert messages[-1].startswith("prepare: 2 shard(s) computed")


def test_a_changed_input_is_recomputed(tmp_path, ray_local):
    write_synthetic(tmp_path / "data", tasks=["LaMP_2"], users=10, seed=0)
    first = prepare(tmp_path / "data", tmp_path / "cache", retrievers=["BM25"], log=lambda _: None)
    questions = tmp_path / "data" / "LaMP_2" / "dev" / "dev_questions.json"
    records = json.loads(questions.read_text())
    records[0]["profile"] = records[0]["profile"][:3]
    questions.write_text(json.dumps(records))
    second = prepare(tmp_path / "data", tmp_path / "cache", retrievers=["BM25"], log=lambda _: None)
    assert dev(first).examples != dev(second).examples
    assert dev(first).rankings != dev(second).rankings
    train = [s for s in first if s.split == "train"][0], [s for s in second if s.split == "train"][0]
    assert train[0] == train[1]  # the untouched split is still cached
    assert pq.read_table(dev(second).examples).column("profile")[0].as_py().__len__() == 3


def complete_entries(cache: Path):
    """Every cache entry that looks complete (not a hidden temporary directory),
    with its Parquet row count; reading it fails if it is not whole."""
    return {path.parent.name: pq.read_table(path).num_rows for path in cache.rglob("*.parquet")
            if not path.parent.name.startswith(".")}


@pytest.mark.slow  # tens of seconds waiting on other processes: out of the quick loop
def test_a_killed_prepare_leaves_no_complete_looking_shard(tmp_path):
    write_synthetic(tmp_path / "data", tasks=["LaMP_2"], users=200, seed=0)
    cache = tmp_path / "cache"
    process = subprocess.Popen([sys.executable, str(ROOT / "experiments.py"), "prepare", "--data",
                                str(tmp_path / "data"), "--cache", str(cache)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".") and "tmp" in p.name
                                             for p in cache.rglob("*") if "seed" in p.name):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert any(p.name.startswith(".") for p in cache.rglob("*")), "killed before any write began"
    partial = complete_entries(cache)
    done = run_cli("prepare", "--data", tmp_path / "data", "--cache", cache)
    assert done.returncode == 0, done.stderr[-2000:]
    complete = complete_entries(cache)
    for name, rows in partial.items():
        assert complete[name] == rows
    assert sum(1 for name in complete if name.startswith("Full_Random")) == 2
    assert all(rows in (160, 40) for rows in complete.values())


def test_one_or_two_workers_give_identical_shards(tmp_path, ray_local):
    # Enough users for several Parquet row groups, so that two workers both get blocks.
    write_synthetic(tmp_path / "data", tasks=["LaMP_2"], users=700, seed=4, profile_size=20)
    one = prepare(tmp_path / "data", tmp_path / "one", retrievers=RETRIEVERS, workers=1, log=lambda _: None)
    two = prepare(tmp_path / "data", tmp_path / "two", retrievers=RETRIEVERS, workers=2, log=lambda _: None)
    assert pq.ParquetFile(one[0].examples).metadata.num_row_groups > 1  # train
    for a, b in zip(one, two):
        assert pq.read_table(a.examples).equals(pq.read_table(b.examples))
        assert a.rankings.keys() == b.rankings.keys()
        for key in a.rankings:
            assert pq.read_table(a.rankings[key]).equals(pq.read_table(b.rankings[key])), key
