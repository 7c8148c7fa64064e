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
    assert list(NAMED_GRIDS) == list(FIXTURE)
    assert sorted(path.stem for path in NAMED.glob("*.yaml")) == sorted(NAMED_GRIDS)


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
