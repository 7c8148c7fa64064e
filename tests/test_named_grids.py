"""The named grids, read from their YAML files by name, expand to exactly what
they did when they were dicts in experiments.py: tests/fixtures/named_grids.json
was written once by that code (every grid's settings, its cells' keys and params
in order, and its published values, mappings as [key, value] pairs so that JSON
keeps their keys' types)."""

import json
from pathlib import Path

import pytest

from grid.spec import NAMED, NAMED_GRIDS, Training, load_grid
from grid.tiny import TINY_TRAINING

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "named_grids.json").read_text())


def pairs(value):
    """Mappings as [key, value] pairs, as the fixture holds them."""
    if isinstance(value, dict):
        return [[k, pairs(v)] for k, v in value.items()]
    return value


def test_every_named_grid_is_a_file_of_its_name_listed_in_the_fixtures_order():
    assert list(NAMED_GRIDS) == [*FIXTURE, "lamp-baselines"]  # the fixture's, then those added since
    assert sorted(path.stem for path in NAMED.glob("*.yaml")) == sorted(NAMED_GRIDS)


def test_lamp_baselines_crosses_lamps_retrievers_with_both_settings_at_k_1():
    spec = load_grid("lamp-baselines")
    cells = spec.cells()
    assert len(cells) == 6 * 2 * 4 and spec.predict_test and not spec.published
    assert {(c.cell.task, c.cell.setting, c.cell.retriever, c.cell.k) for c in cells} == {
        (task, setting, retriever, 0 if retriever == "none" else 1) for task in spec.tasks
        for setting in ("user", "time") for retriever in ("none", "Recency", "BM25", "Contriever")}
    assert "LaMP_6" not in spec.tasks  # Avocado's e-mails are not public
    keys = {c.key for c in cells}
    assert "LaMP_2/time/lamp/Contriever/k=1/both/start/offset=0/seed=0/google/flan-t5-base" in keys
    assert "LaMP_2/lamp/Recency/k=1/both/start/offset=0/seed=0/google/flan-t5-base" in keys
    contriever = next(c for c in cells if c.cell.retriever == "Contriever")
    assert contriever.params()["retriever_model"] == "facebook/contriever"


@pytest.mark.slow
def test_lamp_baselines_reduced_runs_on_synthetic_data_and_its_report_draws_it(ray_local, tmp_path):
    """Reduced: LaMP_2 on the time-based layout (synth's user-based items carry no dates
    for Recency), the `vote` model, a small encoder built here for Contriever."""
    from grid.run import run_grid
    from grid.spec import with_overrides
    from grid.tiny import build_tiny_encoder
    from lamp.synth import write_synthetic
    from tests.cli import call_cli

    data = tmp_path / "data"
    write_synthetic(data, ["LaMP_2"], users=30, seed=0, setting="time")
    encoder = build_tiny_encoder(data, ["LaMP_2"], tmp_path / "encoder")
    spec = with_overrides(load_grid("lamp-baselines"), model="vote", tasks=["LaMP_2"], setting="time",
                          retriever_model=str(encoder), predict_test=False)
    rows = run_grid(spec, str(data), tmp_path / "work", log=lambda _: None)
    assert sorted(r.cell.cell.retriever for r in rows) == ["BM25", "Contriever", "Recency", "none"]
    assert all(r.status == "FINISHED" and 0 <= r.metrics["dev_accuracy"] <= 1 for r in rows)
    done = call_cli("report", "lamp-baselines", "--model", "vote", "--tasks", "LaMP_2", "--setting", "time",
                    "--retriever-model", encoder, "--workdir", tmp_path / "work", "--out", tmp_path / "report")
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "report" / "report.md").read_text()
    for retriever in ("Recency/", "BM25/", f"Contriever[{encoder}]/"):  # another encoder than LaMP's: in the key
        assert f"| LaMP_2/time/lamp/{retriever}k=1/" in table, table


@pytest.mark.parametrize("name", list(FIXTURE))
def test_a_named_grid_expands_as_it_did(name):
    spec = load_grid(name)
    expanded = {"name": spec.name, "tasks": list(spec.tasks), "model": spec.model, "data": spec.data,
                "seeds": list(spec.seeds), "recipe": spec.recipe, "published": pairs(spec.published),
                "cells": [[c.key, c.params()] for c in spec.cells()]}
    # As JSON text: 0 and 0.0, 1 and True are equal in Python, not here.
    assert json.dumps(expanded, indent=1) == json.dumps(FIXTURE[name], indent=1)


def test_the_demo_runs_on_the_tiny_models_schedule_with_shorter_prompts():
    assert load_grid("demo").training == Training(**{**TINY_TRAINING, "max_prompt_tokens": 160})


def test_a_users_grid_file_carries_published_values_as_a_named_one_does(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text((NAMED / "paper-fig-c.yaml").read_text().replace("name: paper-fig-c", "name: mine"))
    theirs, ours = load_grid("paper-fig-c"), load_grid(str(mine))
    assert ours.name == "mine" and ours.published == theirs.published and ours.cells() == theirs.cells()
