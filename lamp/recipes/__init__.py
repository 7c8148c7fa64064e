"""Recipes (docs/design.md §7a): how a cell's prompts are made, and how its model's answers
are read. `lamp` is ours (lamp/recipes/lamp.py); `study` is the study's code,
reproduced (lamp/recipes/study.py). A cell names its recipe (Cell.recipe: an
MLflow param and part of the cell's key); whatever differs between recipes, the
rest of the code asks of the Recipe that name gives (get_recipe).
"""

from typing import Protocol

from lamp.errors import LampError
from lamp.recipes.lamp import LampRecipe
from lamp.recipes.study import StudyRecipe


class Recipe(Protocol):
    name: str
    # What it needs of a split. True: it retrieves by slicing the rankings stored per
    # split (grid.shards), a few rows at a time, other users' items from the split's
    # own ItemPool. False: it retrieves as it renders, over whole splits held in
    # memory, other users' items from train's and dev's examples.
    reads_rankings: bool
    # Whether every render is the seed's own, whatever the cell's retrievers and order.
    seeds_every_render: bool

    def check(self, cell) -> None:
        """Refuses, in one line, a cell (lamp.cell.Cell) the recipe cannot run."""

    def retrieve(self, cell, examples: list, limit: int | None = None, pool=None, train: list = (),
                 dev: list = ()) -> list:
        """Per example of examples[:limit], in file order, the profile items its prompt is built from."""

    def prompts(self, cell, examples: list, items: list, counter, max_tokens: int) -> list:
        """The lamp.prompts.Prompt of each example, from its retrieved items, for a budget of max_tokens."""

    def prompt_tokens(self, decoder_only: bool, max_tokens: int) -> int:
        """The budget prompts are built for, given the grid's (max_tokens)."""

    def model_inputs(self, tokenizer, task: str, prompts: list, max_tokens: int, decoder_only: bool) -> tuple:
        """(texts, token ids): what the model reads of the prompts."""

    def decoding(self, task: str, beams: int, decoder_only: bool) -> dict:
        """The keyword arguments of model.generate that decode an answer."""

    def answer(self, generated: str, decoder_only: bool) -> str:
        """The prediction a generated text gives."""


RECIPES = {recipe.name: recipe for recipe in (LampRecipe(), StudyRecipe())}


def get_recipe(name: str) -> Recipe:
    """The recipe of that name, or a clear error naming the valid ones."""
    if name not in RECIPES:
        raise LampError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
    return RECIPES[name]
