"""Behaviour held across a refactor: `render --json` of every retriever, under both
recipes, on two tasks, is what the code printed when the fixture was captured
(535c591, before #27's restructuring). The render is what a cell trains on, so a
change here is a change of every number downstream: it must be deliberate, and
the fixture captured again in the same commit."""

import json
from pathlib import Path

import pytest

from tests.cli import call_cli

FIXTURES = Path(__file__).parent / "fixtures"
# A T5 config and a tokenizer trained on synthetic data, without weights: what a
# render reads of a model. Committed, so no model-building code is under test here.
TOKENIZER = FIXTURES / "tiny-tokenizer"
EXPECTED = FIXTURES / "render-before-27.jsonl"


def cells():
    """Every retriever under both recipes, with the other axes varied across them."""
    out = []
    for task in ("LaMP_2", "LaMP_4"):
        for recipe in ("lamp", "study"):
            out += [
                {"task": task, "recipe": recipe, "retriever": "none"},
                {"task": task, "recipe": recipe, "retriever": "BM25", "k": "3", "ablation": "both", "order": "middle"},
                {"task": task, "recipe": recipe, "retriever": "BM25", "k": "0.5", "ablation": "only_input",
                 "rank-offset": "1" if recipe == "lamp" else "0.25"},
                {"task": task, "recipe": recipe, "retriever": "Random", "k": "2", "ablation": "only_output",
                 "order": "random" if recipe == "lamp" else "start", "seed": "1"},
                {"task": task, "recipe": recipe, "retriever": "Random", "k": "0.25" if recipe == "lamp" else "3",
                 "order": "random", "seed": "2"},
                {"task": task, "recipe": recipe, "retriever": "Full_Random", "k": "4", "ablation": "decouple",
                 "order": "end" if recipe == "lamp" else "start", "seed": "1"},
                {"task": task, "recipe": recipe, "retriever": "RanBM25", "k": "2", "order": "start"},
                {"task": task, "recipe": recipe, "retriever": "Mixed", "k": "3", "order": "random",
                 "input-retriever": "BM25", "output-retriever": "Full_Random" if recipe == "lamp" else "Random"},
            ]
    return out


CELLS = cells()


def render_command(data, cell, model=TOKENIZER) -> list:
    args = [item for name, value in cell.items() for item in (f"--{name}", value)]
    return ["render", "--data", str(data), *args, "--model", str(model), "--max-tokens", "96", "--limit", "3", "--json"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    done = call_cli("synth", "--out", out, "--tasks", "LaMP_2", "LaMP_4", "--users", "40", "--seed", "5")
    assert done.returncode == 0, done.stderr
    return out


def expected_rows() -> dict:
    lines = [json.loads(line) for line in EXPECTED.read_text().splitlines()]
    return {json.dumps(line["cell"], sort_keys=True): line["rows"] for line in lines}


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: "-".join(c[n] for n in ("task", "recipe", "retriever")))
def test_render_is_what_it_was(data, cell):
    done = call_cli(*render_command(data, cell))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert rows, "render printed no rows"
    assert rows == expected_rows()[json.dumps(cell, sort_keys=True)]
