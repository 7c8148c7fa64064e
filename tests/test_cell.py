"""A cell end to end on synthetic data: rendering is deterministic, and the
planted signal shows in the vote baseline."""

import json
from concurrent.futures import ProcessPoolExecutor

import pytest

from lamp.cell import Cell
from lamp.data import find_splits, read_examples
from lamp.metrics import aggregate
from lamp.prompts import WordCounter
from lamp.retrieval import ItemPool
from lamp.synth import write_synthetic
from lamp.vote import vote
from tests.cli import call_cli

CELLS = [
    Cell("LaMP_2", "BM25", 3, "both", "middle"),
    Cell("LaMP_2", "Random", 0.2, "only_output", "random", seed=3),
    Cell("LaMP_2", "Full_Random", 4, "both", "end", seed=1),
    Cell("LaMP_2", "RanBM25", 2, "only_input", "start", rank_offset=1),
    Cell("LaMP_3", "Mixed", 3, "both", "random", input_retriever="BM25", output_retriever="Full_Random"),
    Cell("LaMP_3", "BM25", 2, "decouple", "start"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    write_synthetic(out, tasks=["LaMP_2", "LaMP_3"], users=300, seed=11)
    return out


def dev_examples(data, task):
    (split,) = [s for s in find_splits(data, [task]) if s.split == "dev"]
    return list(read_examples(split))


def render_some(data, cell, ids):
    """Renders the examples with these ids, in this order, in a fresh pool."""
    examples = dev_examples(data, cell.task)
    pool = ItemPool(reversed(examples))  # the pool must not depend on example order
    by_id = {e.id: e for e in examples}
    return {i: cell.render(by_id[i], WordCounter(), pool).text for i in ids}


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: f"{c.task}-{c.retriever}-{c.order}")
def test_prompts_do_not_depend_on_batching_or_processes(data, cell):
    ids = [e.id for e in dev_examples(data, cell.task)]
    whole = render_some(data, cell, ids)
    batches = {}
    for start in range(0, len(ids), 7):  # batches of 7, last batch first
        batches.update(render_some(data, cell, ids[start:start + 7][::-1]))
    assert batches == whole
    with ProcessPoolExecutor(2) as workers:
        halves = workers.map(render_some, [data, data], [cell, cell], [ids[1::2], ids[0::2]])
        two_processes = {k: v for half in halves for k, v in half.items()}
    assert two_processes == whole
    assert len(set(whole.values())) > 1


def vote_metric(examples, cell):
    pool = ItemPool(examples)
    preds = [vote(cell.task, e.input, cell.retrieve(e, pool)) for e in examples]
    metrics = aggregate(cell.task, [e.output for e in examples], preds)
    return metrics["accuracy"] if cell.task == "LaMP_2" else metrics["MAE"]


def test_vote_with_bm25_beats_other_users_items(data):
    results = {}
    for task in ("LaMP_2", "LaMP_3"):
        examples = dev_examples(data, task)
        for retriever in ("none", "Full_Random", "RanBM25", "BM25"):
            cell = Cell(task, retriever, 0 if retriever == "none" else 5)
            results[task, retriever] = vote_metric(examples, cell)
    # LaMP_2 accuracy: higher is better; LaMP_3 MAE: lower is better.
    assert results["LaMP_2", "BM25"] > results["LaMP_2", "Full_Random"] + 0.3
    assert results["LaMP_3", "BM25"] < results["LaMP_3", "Full_Random"] - 0.5
    for task, spread in (("LaMP_2", 0.1), ("LaMP_3", 0.4)):
        baselines = [results[task, r] for r in ("none", "Full_Random", "RanBM25")]
        assert max(baselines) - min(baselines) < spread, results



def test_render_command_json(data):
    done = call_cli("render", "--data", str(data), "--task", "LaMP_2", "--retriever", "BM25", "--k", "2",
                   "--ablation", "only_output", "--order", "end", "--limit", "3", "--json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert set(row) == {"id", "retrieved", "prompt", "input_cut"}  # no model: no token ids
        assert len(row["retrieved"]) == 2 and not row["input_cut"]
        assert row["prompt"].startswith("the tag for the previous movies are ")


@pytest.mark.parametrize("args, message", [
    (["--task", "LaMP_1", "--retriever", "Mixed", "--input-retriever", "BM25", "--output-retriever", "Random"],
     "LaMP_1"),
    (["--task", "LaMP_7", "--retriever", "BM25", "--ablation", "only_output"], "ablation must be 'both'"),
    (["--task", "LaMP_2", "--retriever", "BM25", "--k", "-1"], "k must be >= 0"),
    (["--task", "LaMP_2", "--retriever", "BM25", "--k", "1.5"], "fractional k"),
    (["--task", "LaMP_2", "--retriever", "DPR"], "valid: none, BM25, Random"),
    (["--task", "LaMP_2", "--retriever", "BM25", "--order", "sideways"], "valid: start, end, middle, random"),
    (["--task", "LaMP_2", "--retriever", "BM25", "--ablation", "half"], "valid: both, only_output"),
])
def test_invalid_cells_are_refused_before_any_work(args, message):
    done = call_cli("render", "--data", "/nonexistent", *args)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
