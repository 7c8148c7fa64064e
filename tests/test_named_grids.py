"""The named grids expand to exactly what they did when they were dicts in
experiments.py: tests/fixtures/named_grids.json was written once by that code
(every grid's settings, its cells' keys and params in order, and its published
values, mappings as [key, value] pairs so that JSON keeps their keys' types)."""

import json
from pathlib import Path

import pytest

from experiments import GRIDS, PUBLISHED
from grid.spec import load_grid

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "named_grids.json").read_text())


def pairs(value):
    """Mappings as [key, value] pairs, as the fixture holds them."""
    if isinstance(value, dict):
        return [[k, pairs(v)] for k, v in value.items()]
    return value


def test_the_named_grids_are_the_fixtures_in_its_order():
    assert list(GRIDS) == list(FIXTURE)


@pytest.mark.parametrize("name", list(FIXTURE))
def test_a_named_grid_expands_as_it_did(name):
    spec = load_grid(name, GRIDS)
    expanded = {"name": spec.name, "tasks": list(spec.tasks), "model": spec.model, "data": spec.data,
                "seeds": list(spec.seeds), "recipe": spec.recipe, "published": pairs(PUBLISHED.get(name, {})),
                "cells": [[c.key, c.params()] for c in spec.cells()]}
    # As JSON text: 0 and 0.0, 1 and True are equal in Python, not here.
    assert json.dumps(expanded, indent=1) == json.dumps(FIXTURE[name], indent=1)
