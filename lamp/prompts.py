"""Prompt rendering, the `lamp` recipe (SPEC §5-7): which half of each retrieved
item is shown, where the most relevant items sit, and the token budget.

The budget is a hard cap on what the model receives, special tokens included.
The task input is never cut to make room: the profile block gets what the input
leaves, split evenly over the items, and an item that does not fit its share
loses the tail of its (long) input half, never its (short) output half. Items
that still do not fit are dropped, least relevant first. Only a task input that
alone exceeds the budget is cut, at its tail, and the prompt says so.
"""

import functools
import itertools
from typing import NamedTuple

from lamp.seeding import example_rng
from lamp.tasks import TaskSpec

MAX_PROMPT_TOKENS = 512
ITEM_SEPARATOR = ", and "


class Prompt(NamedTuple):
    text: str
    items: list  # the items shown, in prompt order
    input_cut: bool  # whether the task input lost its tail


def order_layout(order: str, n: int, seed: int, example_id: str) -> list:
    """The ranks (0 = most relevant) in the order they appear in the prompt."""
    ranks = list(range(n))
    if order == "start":
        return ranks
    if order == "end":
        return ranks[::-1]
    if order == "middle":
        # Most relevant in the centre, then alternating outwards:
        # n = 5 -> [3, 1, 0, 2, 4]; n = 6 -> [5, 3, 1, 0, 2, 4].
        return ranks[1::2][::-1] + ranks[0::2]
    if order == "random":
        return [int(r) for r in example_rng(seed, example_id, "order").permutation(n)]
    raise ValueError(f"unknown order {order!r}")


class WhitespaceTokens:
    """Counts whitespace-separated words: the budget when no model is named."""

    special = 0  # tokens a model adds around a prompt
    limit = None  # the model's longest input

    def count(self, text: str) -> int:
        return len(text.split())

    def trim(self, text: str, n: int) -> str:
        return " ".join(text.split()[:n])


class TokenizerTokens:
    """Counts the tokens of a Hugging Face tokenizer, without special tokens.

    Each text is tokenized once and remembered: a grid renders the same profile
    items in many cells. Trimming cuts the original text at a token boundary
    (from the offset mapping), so what is kept is the data's own text.
    """

    def __init__(self, tokenizer, remember: int = 1 << 16):
        self.tokenizer = tokenizer
        self.special = tokenizer.num_special_tokens_to_add()
        # Tokenizers without a known maximum report a huge sentinel.
        self.limit = tokenizer.model_max_length if tokenizer.model_max_length < 1 << 20 else None
        self.token_ends = functools.lru_cache(maxsize=remember)(self._token_ends)

    def _token_ends(self, text: str) -> tuple:
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return tuple(end for _, end in offsets)

    def count(self, text: str) -> int:
        return len(self.token_ends(text))

    def trim(self, text: str, n: int) -> str:
        ends = self.token_ends(text)
        if len(ends) <= n:
            return text
        return text[: ends[n - 1]] if n > 0 else ""


def prompt_budget(tokens, max_tokens: int) -> int:
    """Tokens a prompt's text may take: the budget, never past the model's
    longest input, less the special tokens the model adds."""
    return min(max_tokens, tokens.limit or max_tokens) - tokens.special


def render_item(spec: TaskSpec, item: dict, ablation: str, room: int, tokens) -> str:
    """One retrieved item as the ablation shows it, within `room` tokens if it can."""
    output = str(item[spec.output_half])
    if ablation in ("only_output", "decouple"):
        return f'"{output}"'
    if ablation == "only_input":
        quotes = tokens.count('""')
        return f'"{tokens.trim(item[spec.input_half], max(room - quotes, 0))}"'
    if spec.input_half is None:
        return spec.item_template.format(output=output)
    fixed = tokens.count(spec.item_template.format(input="", output=output))
    half = tokens.trim(item[spec.input_half], max(room - fixed, 0))
    return spec.item_template.format(input=half, output=output)


def insert_after_title(task_input: str, block: str) -> str:
    """LaMP_1: the profile goes right after the paper's quoted title, as LaMP does."""
    title = task_input.find("title")
    close = task_input.find('"', title + len('title "')) if title != -1 else -1
    if close == -1:
        return block + ". " + task_input
    return task_input[: close + 1] + ITEM_SEPARATOR + block + task_input[close + 1 :]


def lead_of(spec: TaskSpec, ablation: str) -> str:
    return {"only_output": spec.output_lead, "decouple": spec.output_lead,
            "only_input": spec.input_lead}.get(ablation, "")


def block_cost(spec: TaskSpec, ablation: str, n: int, tokens) -> int:
    """Tokens the profile block's own words take around n items: lead, joiner, separators."""
    return (tokens.count(lead_of(spec, ablation)) + tokens.count(spec.profile_joiner or ITEM_SEPARATOR)
            + tokens.count(ITEM_SEPARATOR) * (n - 1))


def assemble(spec: TaskSpec, task_input: str, ordered: list, ablation: str, room: int, tokens) -> str:
    """The prompt: the items, each within `room` tokens if it can, joined and set around the input."""
    pieces = [render_item(spec, item, ablation, room, tokens) for item in ordered]
    lead = lead_of(spec, ablation)
    block = f"{lead} {' '.join(pieces)}" if lead else ITEM_SEPARATOR.join(pieces)
    if spec.profile_joiner is None:
        return insert_after_title(task_input, block)
    return block + spec.profile_joiner + task_input


def render_prompt(spec: TaskSpec, task_input: str, items: list, ablation: str, order: str,
                  seed: int, example_id: str, tokens, max_tokens: int = MAX_PROMPT_TOKENS) -> Prompt:
    """The prompt for retrieved `items` (most relevant first), within the budget."""
    budget = prompt_budget(tokens, max_tokens)
    left = budget - tokens.count(task_input)
    if left < 0:
        return Prompt(tokens.trim(task_input, budget), [], True)
    # The most items whose shortest forms (input halves emptied) fit what the input leaves.
    shortest = itertools.accumulate(tokens.count(render_item(spec, item, ablation, 0, tokens)) for item in items)
    n = sum(1 for i, cost in enumerate(shortest, 1) if block_cost(spec, ablation, i, tokens) + cost <= left)
    # Tokens do not add up exactly across joins, so the whole prompt is counted,
    # and the least relevant item dropped until it fits.
    for shown in range(n, 0, -1):
        ordered = [items[rank] for rank in order_layout(order, shown, seed, example_id)]
        room = (left - block_cost(spec, ablation, shown, tokens)) // shown
        text = assemble(spec, task_input, ordered, ablation, room, tokens)
        if tokens.count(text) <= budget:
            return Prompt(text, ordered, False)
    return Prompt(task_input, [], False)
