"""Every cell rendered once, before the trials: a cached render is exactly what
`render --json` prints, whatever the retriever, recipe or tokenizer; a second
render, and a cell that differs only in training settings, render nothing; a
killed render leaves only complete entries."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from grid.model import ModelRef
from grid.render import cell_table, render_grid, selection_fraction
from grid.examples import load_examples
from grid.shards import prepare
from grid.spec import GridCell, Training
from lamp.cell import Cell
from lamp.synth import write_synthetic
from tests.cli import ROOT, call_cli, run_cli

MAX_TOKENS = 128
LAMP_CELLS = [
    Cell("LaMP_2", "BM25", 3, "both", "middle"),
    Cell("LaMP_2", "BM25", 2, "decouple", "start", rank_offset=1),
    Cell("LaMP_2", "Random", 0.25, "only_output", "random", seed=1),
    Cell("LaMP_2", "Full_Random", 4, "only_input", "end", seed=1),
    Cell("LaMP_2", "RanBM25", 2, "both", "start"),
    Cell("LaMP_2", "Mixed", 3, "both", "random", input_retriever="BM25", output_retriever="Full_Random"),
    Cell("LaMP_2", "none"),
]
STUDY_CELLS = [
    Cell("LaMP_2", "Random", 2, "both", "random", seed=1, recipe="study"),
    Cell("LaMP_2", "Full_Random", 3, "only_output", recipe="study"),
    Cell("LaMP_2", "BM25", 0.5, "only_input", rank_offset=0.25, recipe="study"),
    Cell("LaMP_2", "Mixed", 2, "both", "end", input_retriever="Random", output_retriever="BM25", recipe="study"),
]
DECODER_CELLS = [LAMP_CELLS[0], LAMP_CELLS[3], STUDY_CELLS[0]]


@pytest.fixture(scope="module")
def shards(data, tmp_path_factory, ray_local):
    cache = tmp_path_factory.mktemp("cache")
    shard_list = prepare(data, cache, retrievers=["BM25", "Random", "Full_Random", "RanBM25"], seeds=[0, 1],
                         log=lambda _: None)
    return cache, {("LaMP_2", "user"): {s.split: s for s in shard_list}}


@pytest.fixture(scope="module")
def models(data, tmp_path_factory):
    """The tiny T5, and a decoder-only model folder with a tokenizer of its own."""
    from transformers import GPT2Config

    from grid.tiny import TOKENIZER_VOCAB, build_tiny_model, train_tokenizer, training_texts

    root = tmp_path_factory.mktemp("models")
    decoder = root / "decoder"
    train_tokenizer(training_texts(data, ["LaMP_2"]), TOKENIZER_VOCAB).save_pretrained(decoder)
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(decoder)
    return {"t5": ModelRef.named(str(build_tiny_model(data, ["LaMP_2"], root / "tiny"))).resolved(),
            "decoder": ModelRef.named(str(decoder)).resolved()}


def grid_cells(cells, model, **training):
    return [GridCell(cell, model, Training(**{"max_prompt_tokens": MAX_TOKENS, **training})) for cell in cells]


@pytest.fixture(scope="module")
def rendered(shards, models):
    """Zero-shot cells (dev only) of every retriever and recipe, under both tokenizers."""
    cache, by_data = shards
    out = {}
    for name, cells in (("t5", LAMP_CELLS + STUDY_CELLS), ("decoder", DECODER_CELLS)):
        messages = []
        renders = render_grid(grid_cells(cells, name, epochs=0), by_data, models[name], cache,
                              log=messages.append)
        out[name] = renders, messages
    return out


def render_args(cell):
    args = ["--task", cell.task, "--retriever", cell.retriever, "--k", cell.k, "--ablation", cell.ablation,
            "--order", cell.order, "--seed", cell.seed, "--rank-offset", cell.rank_offset, "--recipe", cell.recipe]
    if cell.retriever == "Mixed":
        args += ["--input-retriever", cell.input_retriever, "--output-retriever", cell.output_retriever]
    return args


@pytest.mark.parametrize("model,cell", [("t5", c) for c in LAMP_CELLS + STUDY_CELLS]
                         + [("decoder", c) for c in DECODER_CELLS],
                         ids=lambda x: x if isinstance(x, str) else f"{x.recipe}-{x.retriever}-{x.ablation}")
def test_a_cached_render_is_what_render_prints(data, models, rendered, model, cell):
    renders, _ = rendered[model]
    key = GridCell(cell, model, Training(max_prompt_tokens=MAX_TOKENS, epochs=0)).key
    rows = pq.read_table(renders[key]["dev"].path).to_pylist()
    done = call_cli("render", "--data", data, *render_args(cell), "--model", models[model].path,
                   "--max-tokens", MAX_TOKENS, "--json")
    assert done.returncode == 0, done.stderr
    expected = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["id"], r["prompt"], r["retrieved"], r["prompt_ids"], r["input_cut"]) for r in rows] == \
        [(e["id"], e["prompt"], e["retrieved"], e["input_ids"], e["input_cut"]) for e in expected]
    assert len(rows) == 12 and (cell.retriever == "none" or any(r["retrieved"] for r in rows))
    if model == "decoder":  # the answer follows the prompt, and only the answer is learned
        assert all(r["input_ids"][:len(r["prompt_ids"])] == r["prompt_ids"] and
                   r["labels"][:len(r["prompt_ids"])] == [-100] * len(r["prompt_ids"]) for r in rows)
    stats = renders[key]["dev"].stats
    assert stats["rows"] == 12
    assert stats["items_shown"] == pytest.approx(sum(len(r["retrieved"]) for r in rows) / 12)


def test_a_cell_table_is_what_render_prints(data, shards):
    """cell_table renders one cell in this process, with the code the pipeline runs."""
    _, by_data = shards
    for cell in LAMP_CELLS:
        done = call_cli("render", "--data", data, *render_args(cell), "--json")
        assert done.returncode == 0, done.stderr
        expected = {row["id"]: (row["prompt"], row["retrieved"]) for row in map(json.loads, done.stdout.splitlines())}
        rows = cell_table(by_data["LaMP_2", "user"]["dev"], cell).to_pylist()
        assert {row["id"]: (row["prompt"], list(row["retrieved"])) for row in rows} == expected and len(rows) == 12


@pytest.mark.parametrize("cell", STUDY_CELLS, ids=lambda c: f"{c.retriever}-{c.ablation}-{c.order}")
def test_a_study_cell_table_with_a_model_is_what_render_prints(data, shards, models, cell):
    _, by_data = shards
    done = call_cli("render", "--data", data, *render_args(cell), "--model", models["t5"].path,
                    "--max-tokens", MAX_TOKENS, "--json")
    assert done.returncode == 0, done.stderr
    expected = [json.loads(line) for line in done.stdout.splitlines()]
    splits = by_data["LaMP_2", "user"]
    rows = cell_table(splits["dev"], cell, models["t5"], max_tokens=MAX_TOKENS, splits=splits).to_pylist()
    assert [(r["id"], r["prompt"], r["retrieved"], r["input_ids"], r["input_cut"]) for r in rows] == \
        [(e["id"], e["prompt"], e["retrieved"], e["input_ids"], e["input_cut"]) for e in expected]
    assert all(len(r["input_ids"]) <= MAX_TOKENS for r in rows) and any(r["retrieved"] for r in rows)
    assert all(r["input_ids"][-1] == 1 and r["labels"][-1] == 1 for r in rows)  # T5's </s>


def test_the_prompt_budget_caps_the_prompt_and_keeps_the_input_whole(data, shards):
    _, by_data = shards
    dev, bm25 = by_data["LaMP_2", "user"]["dev"], LAMP_CELLS[0]
    small = cell_table(dev, bm25, max_tokens=100).to_pylist()
    done = call_cli("render", "--data", data, *render_args(bm25), "--max-tokens", 100, "--json")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["prompt"] for line in done.stdout.splitlines()] == [row["prompt"] for row in small]
    full = cell_table(dev, bm25).to_pylist()
    inputs = {e.id: e.input for e in load_examples(dev.examples)}
    for short, long in zip(small, full):
        task_input = inputs[short["id"]]
        assert len(short["prompt"].split()) <= 100
        if short["input_cut"]:  # only an input over the budget alone is cut, and then shown alone
            assert short["prompt"] == " ".join(task_input.split()[:100]) and not short["retrieved"]
        else:
            assert short["prompt"].endswith(task_input) and set(short["retrieved"]) <= set(long["retrieved"])
    assert any(row["retrieved"] for row in small)


def test_rendering_again_or_with_other_training_settings_renders_nothing(shards, models, rendered):
    cache, by_data = shards
    _, first = rendered["t5"]
    assert first == [f"render: {len(LAMP_CELLS + STUDY_CELLS)} cell(s) rendered, 0 cached"]
    again = []
    render_grid(grid_cells(LAMP_CELLS + STUDY_CELLS, "t5", epochs=0), by_data, models["t5"], cache,
                log=again.append)
    assert again == [f"render: 0 cell(s) rendered, {len(LAMP_CELLS + STUDY_CELLS)} cached"]
    # Another lr, and another seed of a cell whose prompts no seed changes: the same render.
    bm25 = LAMP_CELLS[0]
    variants = grid_cells([bm25], "t5", epochs=0, lr=1e-3) + [
        GridCell(Cell(**{**bm25.__dict__, "seed": 7}), "t5", Training(max_prompt_tokens=MAX_TOKENS, epochs=0))]
    reused = []
    renders = render_grid(variants, by_data, models["t5"], cache, log=reused.append)
    assert reused == ["render: 0 cell(s) rendered, 1 cached"]
    assert len({r["dev"].directory for r in renders.values()}) == 1
    # A longer budget changes the prompts: a render of its own.
    longer = []
    render_grid(grid_cells([bm25], "t5", epochs=0, max_prompt_tokens=MAX_TOKENS * 2), by_data, models["t5"], cache,
                log=longer.append)
    assert longer == ["render: 1 cell(s) rendered, 0 cached"]


def test_a_training_cell_renders_train_with_its_held_out_users_marked(shards, models):
    cache, by_data = shards
    [cell] = grid_cells([LAMP_CELLS[1]], "t5", epochs=1, limit_train=30)
    renders = render_grid([cell], by_data, models["t5"], cache, log=lambda _: None)[cell.key]
    train = pq.read_table(renders["train"].path).to_pylist()
    assert [r["row"] for r in train] == list(range(30))
    assert all(r["selection"] == selection_fraction(r["user"]) for r in train)
    held_out = [r["id"] for r in train if r["selection"] < 0.5]
    assert renders["train"].table(["id"], held_out=True, share=0.5).column("id").to_pylist() == held_out
    kept = renders["train"].table(["id", "labels"], held_out=False, share=0.5)
    assert kept.column_names == ["id", "labels"] and kept.num_rows == 30 - len(held_out)
    assert not set(kept.column("id").to_pylist()) & set(held_out)
    assert 0 < len(held_out) < 30


@pytest.mark.slow  # tens of seconds waiting on other processes: out of the quick loop
def test_a_killed_render_leaves_only_complete_entries(tmp_path):
    write_synthetic(tmp_path / "data", tasks=["LaMP_2"], users=400, seed=0)
    grid = tmp_path / "grid.yaml"
    grid.write_text(json.dumps({"name": "killed", "tasks": ["LaMP_2"], "model": "tiny",
                                "axes": [{"retriever": ["BM25", "Random"], "k": [1, 2, 4], "order": ["start", "end"]}],
                                "training": {"max_prompt_tokens": MAX_TOKENS}}))
    args = ["prepare", "--grid", grid, "--data", tmp_path / "data", "--workdir", tmp_path / "work"]
    process = subprocess.Popen([sys.executable, str(ROOT / "experiments.py"), *map(str, args)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    cache = tmp_path / "work" / "cache"
    deadline = time.time() + 300
    while time.time() < deadline and not any(p.name.startswith(".render-") for p in cache.rglob("*")):
        time.sleep(0.05)
    time.sleep(1)  # into the writing
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert any(p.name.startswith(".render-") for p in cache.rglob("*")), "killed before any render began"
    assert all((p / "stats.json").is_file() and pq.read_metadata(p / "rendered.parquet").num_rows > 0
               for p in cache.rglob("render-*"))
    done = run_cli(*args)  # a process of its own: prepare starts its own Ray
    assert done.returncode == 0, done.stderr[-2000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("render:")]
    complete = sorted(cache.rglob("render-*"))
    # 12 cells, each rendering dev and train.
    assert len(complete) == 24 and all(rows_of(p) in (320, 80) for p in complete)
    assert line and line[0].endswith(f"{12 - int(line[0].split()[1])} cached")
    assert not any(p.name.startswith(".render-") for p in cache.rglob("*"))


def rows_of(directory: Path) -> int:
    return pq.read_metadata(directory / "rendered.parquet").num_rows
