"""A cell's prompts rendered straight from the LaMP files, a split in memory:
what `render` prints, and the reference that grid/render.py's cached renders
are held to (tests/test_render.py)."""

from dataclasses import dataclass

from lamp.errors import LampError


@dataclass(frozen=True)
class ReferencePrompt:
    """One example's prompt, as the model reads it."""
    id: str
    retrieved: list  # the ids of the profile items shown
    text: str
    input_ids: list | None  # the model's token ids; None without a model
    input_cut: bool  # the task input was cut to fit the budget
    length: int  # tokens, or whitespace words without a model


def load_tokens(model) -> tuple:
    """(token counting for the budget, whether the model is decoder-only): the
    model's tokenizer, or whitespace words."""
    from lamp.prompts import TokenizerTokens, WhitespaceTokens

    if model is None:
        return WhitespaceTokens(), False
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise LampError(f"cannot load a tokenizer from {model!r}: {str(error).splitlines()[0]}") from None
    try:
        decoder_only = not AutoConfig.from_pretrained(model).is_encoder_decoder
    except (OSError, ValueError):  # a tokenizer folder alone: read as a seq2seq model's
        decoder_only = False
    return TokenizerTokens(tokenizer), decoder_only


def reference_prompts(cell, data, split: str, model: str | None, max_tokens: int, limit: int | None) -> list:
    """The prompts of `split`'s first `limit` examples for a checked cell, with
    `model`'s tokenizer (or words) and a prompt budget of max_tokens."""
    from lamp.cell import model_inputs, prompt_tokens
    from lamp.data import find_splits, read_examples
    from lamp.retrieval import ItemPool

    splits = {}
    for found in find_splits(data, [cell.task]):
        if found.setting == "user" or found.split not in splits:  # user-based where both are, as `run` reads
            splits[found.split] = found
    if split not in splits:
        raise LampError(f"{data}: no {cell.task} {split} split")
    tokens, decoder_only = load_tokens(model)
    examples = list(read_examples(splits[split]))
    pool, users = None, {}
    if cell.needs_pool and cell.recipe == "lamp":
        pool = ItemPool(examples)
    elif cell.needs_pool:  # the study drew users from train and dev
        users = {name: examples if name == split else list(read_examples(splits[name]))
                 for name in ("train", "dev") if name in splits}
    max_tokens = prompt_tokens(cell.recipe, decoder_only, max_tokens)
    prompts = cell.render_split(examples, tokens, max_tokens, pool, users.get("train", ()), users.get("dev", ()),
                                limit)
    texts, ids = [p.text for p in prompts], None
    if model:  # what the model reads
        texts, ids = model_inputs(tokens.tokenizer, cell.task, cell.recipe, texts, max_tokens, decoder_only)
    return [ReferencePrompt(example.id, [item["id"] for item in prompt.items], texts[n], ids[n] if ids else None,
                            prompt.input_cut, len(ids[n]) if ids else tokens.count(texts[n]))
            for n, (example, prompt) in enumerate(zip(examples, prompts))]
