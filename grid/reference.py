"""A cell's prompts rendered straight from the LaMP files, a split in memory:
what `render` prints, and the reference that grid/render.py's cached renders
are held to (tests/test_render.py)."""

from dataclasses import dataclass

from grid.model import TINY, VOTE, ModelRef
from lamp.data import find_splits, read_examples
from lamp.errors import LampError
from lamp.prompts import TokenCounter, WordCounter
from lamp.recipes import get_recipe
from lamp.retrieval import ItemPool, check_dates


@dataclass(frozen=True)
class ReferencePrompt:
    """One example's prompt, as the model reads it."""
    id: str
    retrieved: list  # the ids of the profile items shown
    text: str
    input_ids: list | None  # the model's token ids; None without a model
    input_cut: bool  # the task input was cut to fit the budget
    length: int  # tokens, or whitespace words without a model


def load_counter(name) -> tuple:
    """(token counting for the budget, whether the model is decoder-only): the
    model's tokenizer, or whitespace words."""
    if name is None:
        return WordCounter(), False
    model = ModelRef.named(name)
    if model.kind in (TINY, VOTE):
        raise LampError(f"render --model {name}: name a hub id or a local model folder (`tiny` and `vote` are "
                        "made by a grid: `prepare --grid` renders its cells)")
    model = model.resolved()
    return TokenCounter(model.tokenizer()), model.decoder_only


def reference_prompts(cell, data, split: str, model: str | None, max_tokens: int, limit: int | None) -> list:
    """The prompts of `split`'s first `limit` examples for a checked cell, with
    `model`'s tokenizer (or words) and a prompt budget of max_tokens."""
    splits = {found.split: found for found in find_splits(data, [cell.task]) if found.setting == cell.setting}
    if split not in splits:
        raise LampError(f"{data}: no {cell.task} {cell.setting}-based {split} split")
    counter, decoder_only = load_counter(model)
    examples = list(read_examples(splits[split]))
    if cell.retriever == "Recency" or cell.use_date:  # as `prepare` refuses them, naming the file
        for example in examples:
            check_dates(splits[split].questions, example.id, example.profile, parsed=cell.retriever == "Recency")
    pool, users = None, {}
    recipe = get_recipe(cell.recipe)
    if cell.needs_pool and recipe.reads_rankings:
        pool = ItemPool(examples)
    elif cell.needs_pool:  # the study drew users from train and dev
        users = {name: examples if name == split else list(read_examples(splits[name]))
                 for name in ("train", "dev") if name in splits}
    max_tokens = recipe.prompt_tokens(decoder_only, max_tokens)
    prompts = cell.render_split(examples, counter, max_tokens, pool, users.get("train", ()), users.get("dev", ()),
                                limit)
    texts, ids = [p.text for p in prompts], None
    if model:  # what the model reads
        texts, ids = recipe.model_inputs(counter.tokenizer, cell.task, texts, max_tokens, decoder_only)
    return [ReferencePrompt(example.id, [item["id"] for item in prompt.items], texts[n], ids[n] if ids else None,
                            prompt.input_cut, len(ids[n]) if ids else counter.count(texts[n]))
            for n, (example, prompt) in enumerate(zip(examples, prompts))]
