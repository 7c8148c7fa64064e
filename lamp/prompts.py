"""Prompt rendering, the `lamp` recipe (docs/design.md §5-7): which half of each retrieved
item is shown, where the most relevant items sit, and the token budget.

The budget is a hard cap on what the model receives, special tokens included.
The task input is never cut to make room: the profile block gets what the input
leaves, split evenly over the items, and an item that does not fit its share
loses the tail of its (long) input half, never its (short) output half. Items
that still do not fit are dropped, least relevant first. Only a task input that
alone exceeds the budget is cut, at its tail, and the prompt says so.
"""

import itertools
from collections import OrderedDict
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


class WordCounter:
    """Counts whitespace-separated words: the budget when no model is named."""

    special = 0  # tokens a model adds around a prompt
    limit = None  # the model's longest input

    def prefetch(self, texts) -> None:
        """Nothing to do: splitting on whitespace is cheap (render_prompts passes lazy
        iterables, so their texts are not even built)."""

    def count(self, text: str) -> int:
        return len(text.split())

    def trim(self, text: str, n: int) -> str:
        return " ".join(text.split()[:n])


class TokenCounter:
    """Counts the tokens of a Hugging Face tokenizer, without special tokens.

    Each text is tokenized once and remembered (the `remember` most recently
    used): a grid renders the same profile items in many cells. `prefetch`
    tokenizes many texts in one call, far cheaper than one call per text.
    Trimming cuts the original text at a token boundary (from the offset
    mapping), so what is kept is the data's own text.
    """

    def __init__(self, tokenizer, remember: int = 1 << 16):
        self.tokenizer = tokenizer
        self.special = tokenizer.num_special_tokens_to_add()
        # Tokenizers without a known maximum report a huge sentinel.
        self.limit = tokenizer.model_max_length if tokenizer.model_max_length < 1 << 20 else None
        self.remember = remember
        self.ends = OrderedDict()  # text -> the end offset of each of its tokens, least recently used first

    def prefetch(self, texts) -> None:
        """Tokenizes, in one call, every text of `texts` not yet remembered."""
        new = [text for text in dict.fromkeys(texts) if text not in self.ends]
        if new:
            self._tokenize(new)

    def token_ends(self, text: str) -> tuple:
        if text in self.ends:
            self.ends.move_to_end(text)
            return self.ends[text]
        return self._tokenize([text])[0]

    def _tokenize(self, texts: list) -> list:
        offsets = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        ends = [tuple(end for _, end in pairs) for pairs in offsets]
        self.ends.update(zip(texts, ends))
        while len(self.ends) > self.remember:
            self.ends.popitem(last=False)
        return ends

    def count(self, text: str) -> int:
        return len(self.token_ends(text))

    def trim(self, text: str, n: int) -> str:
        ends = self.token_ends(text)
        if len(ends) <= n:
            return text
        return text[: ends[n - 1]] if n > 0 else ""


def prompt_budget(counter, max_tokens: int) -> int:
    """Tokens a prompt's text may take: the budget, never past the model's
    longest input, less the special tokens the model adds."""
    return min(max_tokens, counter.limit or max_tokens) - counter.special


def render_item(spec: TaskSpec, item: dict, ablation: str, room: int, counter) -> str:
    """One retrieved item as the ablation shows it, within `room` tokens if it can."""
    output = str(item[spec.output_half])
    if ablation in ("only_output", "decouple"):
        return f'"{output}"'
    if ablation == "only_input":
        quotes = counter.count('""')
        return f'"{counter.trim(item[spec.input_half], max(room - quotes, 0))}"'
    if spec.input_half is None:
        return spec.item_template.format(output=output)
    fixed = counter.count(spec.item_template.format(input="", output=output))
    half = counter.trim(item[spec.input_half], max(room - fixed, 0))
    return spec.item_template.format(input=half, output=output)


def item_pieces(spec: TaskSpec, item: dict, ablation: str) -> list:
    """The texts render_item counts for `item`, whatever its room: to tokenize ahead."""
    if ablation in ("only_output", "decouple") or spec.input_half is None:
        return []
    if ablation == "only_input":
        return ['""', item[spec.input_half]]
    return [spec.item_template.format(input="", output=str(item[spec.output_half])), item[spec.input_half]]


def insert_after_title(task_input: str, block: str) -> str:
    """LaMP_1: the profile goes right after the paper's quoted title, as LaMP does."""
    title = task_input.find("title")
    close = task_input.find('"', title + len('title "')) if title != -1 else -1
    if close == -1:
        return block + ". " + task_input
    return task_input[: close + 1] + ITEM_SEPARATOR + block + task_input[close + 1 :]


def block_words(spec: TaskSpec, ablation: str) -> tuple:
    """The profile block's own words: lead, joiner to the input, separator between items."""
    lead = {"only_output": spec.output_lead, "decouple": spec.output_lead,
            "only_input": spec.input_lead}.get(ablation, "")
    return lead, spec.profile_joiner or ITEM_SEPARATOR, ITEM_SEPARATOR


def block_cost(spec: TaskSpec, ablation: str, n: int, counter) -> int:
    """Tokens the profile block's own words take around n items."""
    lead, joiner, separator = block_words(spec, ablation)
    return counter.count(lead) + counter.count(joiner) + counter.count(separator) * (n - 1)


def assemble(spec: TaskSpec, task_input: str, ordered: list, ablation: str, room: int, counter) -> str:
    """The prompt: the items, each within `room` tokens if it can, joined and set around the input."""
    pieces = [render_item(spec, item, ablation, room, counter) for item in ordered]
    lead = block_words(spec, ablation)[0]
    block = f"{lead} {' '.join(pieces)}" if lead else ITEM_SEPARATOR.join(pieces)
    if spec.profile_joiner is None:
        return insert_after_title(task_input, block)
    return block + spec.profile_joiner + task_input


def candidates(spec: TaskSpec, task_input: str, items: list, ablation: str, order: str,
               seed: int, example_id: str, counter, budget: int):
    """The prompts (text, items in prompt order) to try, most items first (none when
    the task input alone does not fit); lazily, as the first one usually fits."""
    left = budget - counter.count(task_input)
    # The most items whose shortest forms (input halves emptied) fit what the input leaves.
    shortest = itertools.accumulate(counter.count(render_item(spec, item, ablation, 0, counter)) for item in items)
    n = sum(1 for i, cost in enumerate(shortest, 1) if block_cost(spec, ablation, i, counter) + cost <= left)
    for shown in range(n, 0, -1):
        ordered = [items[rank] for rank in order_layout(order, shown, seed, example_id)]
        room = (left - block_cost(spec, ablation, shown, counter)) // shown
        yield assemble(spec, task_input, ordered, ablation, room, counter), ordered


def render_prompt(spec: TaskSpec, task_input: str, items: list, ablation: str, order: str,
                  seed: int, example_id: str, counter, max_tokens: int = MAX_PROMPT_TOKENS) -> Prompt:
    """The prompt for retrieved `items` (most relevant first), within the budget."""
    budget = prompt_budget(counter, max_tokens)
    if counter.count(task_input) > budget:
        return Prompt(counter.trim(task_input, budget), [], True)
    # Tokens do not add up exactly across joins, so the whole prompt is counted,
    # and the least relevant item dropped until it fits.
    for text, ordered in candidates(spec, task_input, items, ablation, order, seed, example_id, counter, budget):
        if counter.count(text) <= budget:
            return Prompt(text, ordered, False)
    return Prompt(task_input, [], False)


def render_prompts(spec: TaskSpec, cases: list, ablation: str, order: str, seed: int, counter,
                   max_tokens: int = MAX_PROMPT_TOKENS) -> list:
    """render_prompt for each (example_id, task_input, items) of `cases`, with the
    texts it counts tokenized ahead in three batched calls (each needs the counts of
    the one before), so that most examples then need no tokenizer call of their own.
    The texts go to `prefetch` unbuilt: WordCounter, which needs none, never builds them.
    """
    budget = prompt_budget(counter, max_tokens)
    every_item = [item for _, _, items in cases for item in items]
    counter.prefetch(itertools.chain(
        (task_input for _, task_input, _ in cases), block_words(spec, ablation),
        (piece for item in every_item for piece in item_pieces(spec, item, ablation))))
    counter.prefetch(render_item(spec, item, ablation, 0, counter) for item in every_item)
    counter.prefetch(text for example_id, task_input, items in cases
                    for text, _ in itertools.islice(candidates(spec, task_input, items, ablation, order, seed,
                                                               example_id, counter, budget), 1))
    return [render_prompt(spec, task_input, items, ablation, order, seed, example_id, counter, max_tokens)
            for example_id, task_input, items in cases]
