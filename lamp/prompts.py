"""Prompt rendering (SPEC §5-7): which half of each retrieved item is shown,
where the most relevant items sit, and the token budget.

The task input is never cut. The profile block gets what the input leaves of
the prompt budget, split evenly over the items; an item that does not fit
loses the tail of its (long) input half, never its (short) output half.
"""

import functools

from lamp.seeding import example_rng
from lamp.tasks import TaskSpec

MAX_PROMPT_TOKENS = 512  # the task input keeps up to half of the budget (SPEC §7: 256 of 512)
ITEM_SEPARATOR = ", and "


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


def render_prompt(spec: TaskSpec, task_input: str, items: list, ablation: str, order: str,
                  seed: int, example_id: str, tokens, max_tokens: int = MAX_PROMPT_TOKENS) -> tuple:
    """The prompt for retrieved `items` (most relevant first), and the items in prompt order."""
    if not items:
        return task_input, []
    ordered = [items[rank] for rank in order_layout(order, len(items), seed, example_id)]
    lead = {"only_output": spec.output_lead, "decouple": spec.output_lead,
            "only_input": spec.input_lead}.get(ablation, "")
    budget = max_tokens - min(tokens.count(task_input), max_tokens // 2)
    fixed = (tokens.count(lead) + tokens.count(spec.profile_joiner or ITEM_SEPARATOR)
             + tokens.count(ITEM_SEPARATOR) * (len(ordered) - 1))
    room = max((budget - fixed) // len(ordered), 0)
    pieces = [render_item(spec, item, ablation, room, tokens) for item in ordered]
    block = f"{lead} {' '.join(pieces)}" if lead else ITEM_SEPARATOR.join(pieces)
    if spec.profile_joiner is None:
        return insert_after_title(task_input, block), ordered
    return block + spec.profile_joiner + task_input, ordered
