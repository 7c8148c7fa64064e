"""Contriever (grid/embed.py): the rankings `prepare` stores are those of a plain
NumPy reference over the encoder's own outputs, a rerun embeds nothing, another
encoder embeds again, and a model that is no encoder is refused before any work."""

import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from grid.embed import DEFAULT_RETRIEVER_MODEL, EmbedExamples, resolve_encoder
from grid.examples import load_examples, write_examples
from grid.shards import prepare
from grid.spec import parse_grid
from grid.tiny import build_tiny_encoder
from lamp.cell import Cell
from lamp.data import find_splits
from lamp.errors import LampError
from lamp.retrieval import dense_ranking, document_text, drop_query_items, extract_query
from lamp.synth import write_synthetic
from tests.cli import call_cli

TASKS = ["LaMP_2", "LaMP_4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Few users: each split is one Ray Data batch or two."""
    out = tmp_path_factory.mktemp("data")
    write_synthetic(out, tasks=TASKS, users=12, seed=3)
    return out


@pytest.fixture(scope="module")
def encoder(data, tmp_path_factory):
    """A small BERT encoder (random weights) with a WordPiece tokenizer trained on the data."""
    return build_tiny_encoder(data, TASKS, tmp_path_factory.mktemp("encoders") / "bert")


def reference_ranking(folder, task: str, example, by_input: bool = False) -> list:
    """The example's own item ids, ranked as Contriever does, with the model called
    directly, one text at a time: mean of the token embeddings, dot product, argsort."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder)

    def embed(text: str) -> np.ndarray:
        tokens = tokenizer(text, truncation=True, return_tensors="pt")
        return model(**tokens).last_hidden_state[0].detach().numpy().mean(axis=0)

    items = drop_query_items(task, example.profile, example.input)
    query = embed(extract_query(task, example.input))
    scores = np.array([embed(document_text(task, item, by_input)) @ query for item in items])
    return [items[i]["id"] for i in np.argsort(-scores, kind="stable")]


def test_embedded_batches_rank_as_the_numpy_reference(data, encoder, tmp_path):
    # In this process: an actor's embeddings of a batch, ranked by the dot product.
    (split,) = [s for s in find_splits(data, ["LaMP_4"]) if s.split == "dev"]
    write_examples(split, tmp_path / "examples.parquet")
    batch = pq.read_table(tmp_path / "examples.parquet").slice(0, 4)
    embedded = EmbedExamples("LaMP_4", str(encoder), [False, True])(batch)
    for row, example in enumerate(load_examples(tmp_path / "examples.parquet")[:4]):
        for by_input in (False, True):
            items = embedded.column(f"items/{by_input}")[row].as_py()
            query = np.array(embedded.column("query")[row].as_py(), dtype=np.float32)
            ranking = dense_ranking("LaMP_4", example, query, np.array(items, dtype=np.float32))
            assert [item["id"] for item in ranking.items] == reference_ranking(encoder, "LaMP_4", example, by_input)
            assert list(ranking.scores) == sorted(ranking.scores, reverse=True)


def test_dense_ranking_drops_the_query_item_and_keeps_profile_order_on_ties():
    from lamp.data import Example

    profile = [{"id": str(i), "title": f"t{i}", "text": f"body {i}"} for i in range(4)]
    example = Example(id="e", user="u", input="Generate a headline for the following article: body 1",
                      profile=profile, output="x")
    items = np.array([[1.0, 0.0], [9.0, 0.0], [2.0, 0.0], [2.0, 0.0]], dtype=np.float32)
    ranking = dense_ranking("LaMP_4", example, np.array([1.0, 0.0], dtype=np.float32), items)
    # Item 1's input half is the query itself: the leakage guard drops it, whatever its score.
    assert [item["id"] for item in ranking.items] == ["2", "3", "0"]
    assert ranking.scores.tolist() == [2.0, 2.0, 1.0]


@pytest.fixture(scope="module")
def prepared(data, encoder, tmp_path_factory, ray_local):
    cache, messages = tmp_path_factory.mktemp("cache"), []
    shards = prepare(data, cache, tasks=["LaMP_2"], retrievers=["Contriever", "BM25"], retriever_model=str(encoder),
                     log=messages.append)
    return cache, shards, messages


def ranked_ids(shards, name: str) -> dict:
    """example id -> its ranked items' ids, as a ranking shard stores them."""
    examples = load_examples(shards.examples)
    ranking = pq.read_table(shards.ranking(name, 0) / "ranking.parquet").to_pylist()
    return {examples[r["row"]].id: [examples[row].profile[pos]["id"] for row, pos in zip(r["cand_row"], r["cand_pos"])]
            for r in ranking}


@pytest.mark.slow
def test_prepare_stores_the_rankings_of_the_numpy_reference(prepared, encoder):
    _, shards, messages = prepared
    assert sum(message.startswith("embedded LaMP_2") for message in messages) == 2  # train and dev, once each
    for split in shards:
        examples = {e.id: e for e in load_examples(split.examples)}
        for name, by_input in (("Contriever", False), ("Contriever_input", True)):
            stored = ranked_ids(split, name)
            assert set(stored) == set(examples)
            for example_id in sorted(stored)[:3]:
                assert stored[example_id] == reference_ranking(encoder, "LaMP_2", examples[example_id], by_input)


@pytest.mark.slow
def test_a_rerun_embeds_nothing_and_another_encoder_embeds_again(prepared, data, encoder, tmp_path_factory):
    cache, first, _ = prepared
    embeddings = sorted(p for p in (cache / "LaMP_2").rglob("embeddings*") if p.is_dir())
    assert len(embeddings) == 4  # train and dev, whole items and input halves
    mtimes = [os.stat(p / "embeddings.parquet").st_mtime_ns for p in embeddings]
    messages = []
    again = prepare(data, cache, tasks=["LaMP_2"], retrievers=["Contriever", "BM25"], retriever_model=str(encoder),
                    log=messages.append)
    assert again == first and not any(m.startswith(("embedded", "ranked")) for m in messages)
    assert [os.stat(p / "embeddings.parquet").st_mtime_ns for p in embeddings] == mtimes

    # A copy elsewhere is the same encoder (named by its files, not its path): nothing to embed.
    changed = tmp_path_factory.mktemp("changed")
    shutil.copytree(encoder, changed / "bert")
    messages = []
    assert prepare(data, cache, tasks=["LaMP_2"], retrievers=["Contriever"], retriever_model=str(changed / "bert"),
                   log=messages.append) == [
        type(s)(s.task, s.setting, s.split, s.examples, {k: v for k, v in s.rankings.items() if k[0] != "BM25"
                                                          and k[0] != "BM25_input"}) for s in first]
    assert not any(m.startswith(("embedded", "ranked")) for m in messages)

    # Its weights changed (the same tokenizer): embedded and ranked again; BM25's rankings stay.
    build_tiny_encoder(data, TASKS, changed / "seed1", seed=1)
    shutil.copy(changed / "seed1" / "model.safetensors", changed / "bert" / "model.safetensors")
    messages = []
    other = prepare(data, cache, tasks=["LaMP_2"], retrievers=["Contriever", "BM25"],
                    retriever_model=str(changed / "bert"), log=messages.append)
    assert sum(m.startswith("embedded LaMP_2") for m in messages) == 2
    for before, after in zip(first, other):
        assert after.ranking("BM25", 0) == before.ranking("BM25", 0)
        assert after.ranking("Contriever", 0) != before.ranking("Contriever", 0)
    assert ranked_ids(other[1], "Contriever") != ranked_ids(first[1], "Contriever")


def test_a_model_that_is_no_encoder_is_refused(tmp_path):
    from transformers import T5Config

    with pytest.raises(LampError, match="no such folder"):
        resolve_encoder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LampError, match="no encoder config"):
        resolve_encoder(str(tmp_path / "empty"))
    T5Config(vocab_size=10).save_pretrained(tmp_path / "t5")
    with pytest.raises(LampError, match="is a t5 model, not a text encoder"):
        resolve_encoder(str(tmp_path / "t5"))
    with pytest.raises(LampError, match="not an encoder"):
        resolve_encoder("tiny")
    # An id the hub does not have (here there is no network: nothing is downloaded either way).
    with pytest.raises(LampError, match="not a local folder, and the hub cannot give it"):
        resolve_encoder("no-such-org/no-such-encoder")


def test_prepare_refuses_a_bad_retriever_model_before_any_work(data, tmp_path):
    done = call_cli("prepare", "--data", data, "--tasks", "LaMP_2", "--retrievers", "Contriever",
                    "--retriever-model", tmp_path / "missing", "--workdir", tmp_path / "work")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"lamp-grid prepare: error: retriever model "
                                                f"'{tmp_path / 'missing'}': no such folder"]
    assert not (tmp_path / "work").exists()


def test_contriever_cells_carry_their_encoder_and_other_cells_do_not():
    raw = {"name": "g", "tasks": ["LaMP_2"], "axes": [{"retriever": ["BM25", "Contriever"], "k": [2]}]}
    bm25, contriever = parse_grid(raw, "g.yaml").cells()
    assert "retriever_model" not in bm25.params() and bm25.key == "LaMP_2/lamp/BM25/k=2/both/start/offset=0/seed=0/tiny"
    assert contriever.params()["retriever_model"] == DEFAULT_RETRIEVER_MODEL
    assert contriever.key == "LaMP_2/lamp/Contriever/k=2/both/start/offset=0/seed=0/tiny"
    (_, other) = parse_grid({**raw, "retriever_model": "/models/mine"}, "g.yaml").cells()
    assert other.key == "LaMP_2/lamp/Contriever[/models/mine]/k=2/both/start/offset=0/seed=0/tiny"
    assert type(other).from_params({k: str(v) for k, v in other.params().items()}, "run") == other


def test_the_study_recipe_and_in_process_rendering_refuse_contriever(data):
    with pytest.raises(LampError, match="recipe study never ran Contriever"):
        Cell("LaMP_2", "Contriever", 2, recipe="study").check()
    done = call_cli("render", "--data", data, "--task", "LaMP_2", "--retriever", "Contriever", "--k", 2)
    assert done.returncode == 2 and "embeddings that `prepare` computes" in done.stderr


def test_run_refuses_a_bad_retriever_model_before_any_work(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: dense\ntasks: [LaMP_2]\naxes:\n  - retriever: [Contriever]\n    k: [1]\n")
    done = call_cli("run", grid, "--retriever-model", tmp_path / "t5", "--workdir", tmp_path / "work")
    assert done.returncode == 2 and "no such folder" in done.stderr
    assert not (tmp_path / "work").exists()  # no data written, no MLflow store made


@pytest.mark.slow
def test_a_contriever_grid_renders_the_top_of_its_ranking(prepared, data, encoder, tmp_path):
    # `prepare --grid` with another encoder than the default, over the cache `prepare` filled
    # with it: its cells find their embeddings and rankings there, and render with them.
    cache = prepared[0]
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: dense\ntasks: [LaMP_2]\naxes:\n  - retriever: [Contriever]\n    k: [2]\n"
                    "    ablation: [both, decouple]\n")
    done = call_cli("prepare", "--grid", grid, "--data", data, "--retriever-model", encoder, "--cache", cache,
                    "--workdir", tmp_path / "work")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "render: 2 cell(s) rendered, 0 cached" in done.stdout
    assert "embedded" not in done.stdout and "prepare: 0 shard(s) computed" in done.stdout
    (dev,) = [s for s in prepared[1] if s.split == "dev"]
    tops = [{example_id: ids[:2] for example_id, ids in ranked_ids(dev, name).items()}
            for name in ("Contriever", "Contriever_input")]
    renders = [pq.read_table(p / "rendered.parquet", columns=["id", "retrieved"]).to_pylist()
               for p in cache.rglob("render-*")]
    shown = [{r["id"]: r["retrieved"] for r in rows} for rows in renders if len(rows) == len(tops[0])]
    assert sorted(map(str, shown)) == sorted(map(str, tops))  # the dev split of `both`, and of `decouple`
