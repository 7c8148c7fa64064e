"""Precomputed shards: they reproduce `render`, the cache hits, misses and
invalidates, a killed prepare leaves nothing that looks complete, and the
worker count does not change a shard."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from grid.shards import cell_dataset, cell_table, load_examples, prepare
from lamp.cell import Cell
from lamp.synth import write_synthetic
from tests.cli import ROOT, run_cli

RETRIEVERS = ["BM25", "Random", "Full_Random", "RanBM25"]
CELLS = [
    Cell("LaMP_2", "BM25", 3, "both", "middle"),
    Cell("LaMP_2", "BM25", 2, "decouple", "start", rank_offset=1),
    Cell("LaMP_2", "Random", 0.25, "only_output", "random", seed=1),
    Cell("LaMP_2", "Full_Random", 4, "only_input", "end", seed=1),
    Cell("LaMP_2", "RanBM25", 2, "both", "start"),
    Cell("LaMP_2", "Mixed", 3, "both", "random", input_retriever="BM25", output_retriever="Full_Random"),
    Cell("LaMP_2", "none"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    write_synthetic(out, tasks=["LaMP_2"], users=60, seed=2)
    return out


@pytest.fixture(scope="module")
def shards(data, tmp_path_factory, ray_local):
    cache = tmp_path_factory.mktemp("cache")
    return cache, prepare(data, cache, retrievers=RETRIEVERS, seeds=[0, 1], log=lambda _: None)


def dev(shard_list):
    (split,) = [s for s in shard_list if s.split == "dev"]
    return split


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: f"{c.retriever}-{c.ablation}-{c.order}")
def test_shards_reproduce_render(data, shards, cell):
    _, shard_list = shards
    args = ["render", "--data", data, "--task", cell.task, "--retriever", cell.retriever, "--k", cell.k,
            "--ablation", cell.ablation, "--order", cell.order, "--seed", cell.seed,
            "--rank-offset", cell.rank_offset, "--json"]
    if cell.retriever == "Mixed":
        args += ["--input-retriever", cell.input_retriever, "--output-retriever", cell.output_retriever]
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    expected = {row["id"]: (row["prompt"], row["retrieved"]) for row in map(json.loads, done.stdout.splitlines())}
    rows = cell_dataset(dev(shard_list), cell).take_all()
    assert {row["id"]: (row["prompt"], list(row["retrieved"])) for row in rows} == expected
    assert len(rows) == 12


@pytest.fixture(scope="module")
def tiny(data, tmp_path_factory):
    from grid.tiny import build_tiny_model

    return build_tiny_model(data, ["LaMP_2"], tmp_path_factory.mktemp("model") / "tiny")


def test_cell_dataset_carries_token_ids_given_a_model(shards, tiny):
    _, shard_list = shards
    rows = cell_dataset(dev(shard_list), CELLS[0], model=str(tiny)).take(3)
    for row in rows:
        assert len(row["input_ids"]) > len(row["prompt"].split()) / 2
        assert row["input_ids"][-1] == 1 and row["labels"][-1] == 1  # T5's </s>


STUDY_CELLS = [
    Cell("LaMP_2", "Random", 2, "both", "random", seed=1, recipe="study"),
    Cell("LaMP_2", "Full_Random", 3, "only_output", recipe="study"),
    Cell("LaMP_2", "RanBM25", 2, "decouple", rank_offset=1, recipe="study"),
    Cell("LaMP_2", "BM25", 0.5, "only_input", rank_offset=0.25, recipe="study"),
    Cell("LaMP_2", "Mixed", 2, "both", "end", input_retriever="Random", output_retriever="BM25", recipe="study"),
]


@pytest.mark.parametrize("cell", STUDY_CELLS, ids=lambda c: f"{c.retriever}-{c.ablation}-{c.order}")
def test_study_cells_render_from_the_cache_as_render_does(data, shards, tiny, cell):
    _, shard_list = shards
    args = ["render", "--data", data, "--task", cell.task, "--retriever", cell.retriever, "--k", cell.k,
            "--ablation", cell.ablation, "--order", cell.order, "--seed", cell.seed, "--rank-offset",
            cell.rank_offset, "--recipe", "study", "--model", tiny, "--max-tokens", 128, "--json"]
    if cell.retriever == "Mixed":
        args += ["--input-retriever", cell.input_retriever, "--output-retriever", cell.output_retriever]
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    expected = [json.loads(line) for line in done.stdout.splitlines()]
    splits = {s.split: s for s in shard_list}
    rows = cell_table(splits["dev"], cell, str(tiny), max_tokens=128, splits=splits).to_pylist()
    assert [(r["id"], r["prompt"], r["retrieved"], r["input_ids"], r["input_cut"]) for r in rows] == \
        [(e["id"], e["prompt"], e["retrieved"], e["input_ids"], e["input_cut"]) for e in expected]
    assert all(len(r["input_ids"]) <= 128 for r in rows) and any(r["retrieved"] for r in rows)


def test_the_prompt_budget_caps_the_prompt_and_keeps_the_input_whole(data, shards):
    _, shard_list = shards
    small = cell_table(dev(shard_list), CELLS[0], max_tokens=100).to_pylist()
    done = run_cli("render", "--data", data, "--task", "LaMP_2", "--retriever", "BM25", "--k", 3, "--order", "middle",
                   "--max-tokens", 100, "--json")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["prompt"] for line in done.stdout.splitlines()] == [row["prompt"] for row in small]
    full = cell_table(dev(shard_list), CELLS[0]).to_pylist()
    inputs = {e.id: e.input for e in load_examples(dev(shard_list).examples)}
    for short, long in zip(small, full):
        task_input = inputs[short["id"]]
        assert len(short["prompt"].split()) <= 100
        if short["input_cut"]:  # only an input over the budget alone is cut, and then shown alone
            assert short["prompt"] == " ".join(task_input.split()[:100]) and not short["retrieved"]
        else:
            assert short["prompt"].endswith(task_input) and set(short["retrieved"]) <= set(long["retrieved"])
    assert any(row["retrieved"] for row in small)


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
