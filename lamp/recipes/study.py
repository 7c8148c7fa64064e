"""The `study` recipe (docs/design.md §7a): the study's retrieval and prompts, reproduced
from its code, defects included, so that its published numbers are compared
like with like.

The code reproduced is Bingo-W/Personalisation-in-LLM at d498d21:
data_process/datasets.py, lamp_prompt.py, lamp_prompt_ablation.py and utils.py;
retrival_models/bm25.py and random_selection.py. What it does, and we do here:

- A split is mapped by `datasets` in 24 processes (`process_num`), each a
  contiguous part forked from a process whose global `random` was just seeded,
  in batches of 1000 (`process_batch_size`): the retrieval of a whole batch,
  then its prompts. Every random draw comes from that one stream, so a draw
  depends on the example's place in the file, as it did in the study.
- BM25 with idf log(1 + (N - df + 0.5)/(df + 0.5)), numpy's sums; the first
  profile item whose input half equals the query is popped first (LaMP_1: whose
  title is the paper's), and a fractional k is counted after that.
- Random: `random.sample`, no leakage guard; the whole profile, in its order,
  when k is larger. Full_Random and RanBM25: the stream is reseeded per batch,
  users (examples of train and dev, the user included) drawn with replacement
  in proportion to their profile size: k users for Full_Random, then k of their
  items; a fixed number of users for RanBM25, as many of their items, then BM25.
- Prompts: the study's strings character for character, each item's input half
  cut to its share of (512 - 256) tokens with the tokenizer's own encode and
  decode, then the whole prompt cut to 512 tokens by the tokenizer, which can
  drop later items and the task input.
- Llama-2-7b-chat, zero-shot (Eval_Llama2.py, LlamaDatasets): prompts built
  for 3000 tokens, generation tasks' input quoted after its anchor, cut and
  decoded back to text (special tokens and all), `\nAnswer:` appended; decoded
  by sampling beam search (4 beams, 128 new tokens), the answer the first line
  after the last `Answer:`, stripped of quotes. Any decoder-only model gets this
  path under the study recipe.
"""

import math
import random
import re
from collections import Counter

import numpy as np

from lamp.errors import LampError
from lamp.prompts import Prompt, order_layout
from lamp.retrieval import DENSE, check_cell
from lamp.tasks import LAMP_PROFILE_SIZE, get_task

PROCESSES = 24  # process_num
BATCH = 1000  # process_batch_size
CHAT_TOKENS = 3000  # input_max_length for Llama-2-7b-chat (utils/parser.py)
CHAT_NEW_TOKENS = 128  # Eval_Llama2.py's max_new_tokens, with do_sample=True and num_beams=4

# BM25 (retrival_models/bm25.py): the query is the text after the last of these,
# the documents the input half's words then the output half's (`decouple`: the
# input half's alone). LaMP_1's query is every quoted phrase of its input.
QUERY_AFTER = {"LaMP_2": "description:",
               "LaMP_3": "just answer with 1, 2, 3, 4, or 5 without further explanation. review:",
               "LaMP_4": "for the following article: ", "LaMP_5": "the following abstract of a paper: ",
               "LaMP_7": "the following tweet without any explanation before or after it: "}
DOCUMENT = {"LaMP_1": ("abstract", "title"), "LaMP_2": ("description", "tag"), "LaMP_3": ("text", "score"),
            "LaMP_4": ("text", "title"), "LaMP_5": ("abstract", "title"), "LaMP_7": ("text", None)}

# Full items (data_process/lamp_prompt.py): the template, the field trimmed to
# the item's share, the tokens held back from the profile's share, and what
# joins the profile block to the task input (LaMP_1: inserted after its title).
ITEM = {"LaMP_1": ('"{title}"', "title", 0, None),
        "LaMP_2": ('the tag for the movie:"{description}" is "{tag}"', "description", 0, ". "),
        "LaMP_3": ('{score} is the score for"{text}"', "text", 0, ". "),
        "LaMP_4": ('"{title}" is the title for"{text}"', "text", 5, ". "),
        "LaMP_5": ('"{title}" is the title for"{abstract}"', "abstract", 0, ". Following the given patterns "),
        "LaMP_7": ('"{text}"', "text", 10, " are written by a person. Following the given patterns ")}

# One-half blocks (data_process/lamp_prompt_ablation.py), per task and half shown:
# lead, field, tail, tokens held back, slack added to the length test, slack
# added to the cut. LaMP_3's output half is its scores joined by ", ", unquoted.
ABLATION = {
    ("LaMP_2", "output"): ("the tag for the previous movies are", "tag", "", 0, 0, 0),
    ("LaMP_2", "input"): ("The previous movies are ", "description", "", 0, 0, 0),
    ("LaMP_3", "output"): ("", "score", " is the score for the previous review", 0, 8, 8),
    ("LaMP_3", "input"): ("The previous reviews are ", "text", "", 0, 0, 0),
    ("LaMP_4", "output"): ("", "title", " is the title for previous articles", 5, 6, 6),
    ("LaMP_4", "input"): ("The previous articles are ", "text", "", 5, 6, 0),
    ("LaMP_5", "output"): ("", "title", " is the title for the previous papers", 0, 7, 7),
    ("LaMP_5", "input"): ("The previous papers are ", "abstract", "", 0, 7, 0),
}
SHOWN_HALF = {"only_output": "output", "decouple": "output", "only_input": "input"}


# ----------------------------------------------------------------------------- retrieval


def bm25_score(query_terms, query_counts, document: list, total_docs: int, doc_freq: Counter, avgdl,
               k1=1.5, b=0.75):
    """One document's score, as bm25_score_np computes it (the sum over the sorted common terms)."""
    document_terms, document_counts = np.unique(document, return_counts=True)
    common = np.intersect1d(query_terms, document_terms)
    idf = np.array([np.log((total_docs - doc_freq[t] + 0.5) / (doc_freq[t] + 0.5) + 1.0) for t in common])
    tf_query = query_counts[query_terms.searchsorted(common)]
    tf_document = document_counts[document_terms.searchsorted(common)]
    numerator = tf_document * (k1 + 1) * tf_query
    denominator = tf_document + k1 * (1 - b + b * len(document) / avgdl)
    return np.sum(idf * numerator / denominator)


def quoted(text: str) -> list:
    return re.findall(r'"(.*?)"', text)


def bm25(task: str, task_input: str, profile: list, k, ablation: str = "both", target=0) -> list:
    """The study's BM25 retrieval of one example; pops the leakage item from `profile`, as it does."""
    if task == "LaMP_1":
        phrases = quoted(task_input)
        query, own = [word for phrase in phrases for word in phrase.split()], phrases[0]
        own_field = "title"
    else:
        own = task_input.split(QUERY_AFTER[task])[-1].strip()
        query, own_field = own.split(), DOCUMENT[task][0]
    for i, item in enumerate(profile):
        if str(item[own_field]) == own:
            profile.pop(i)
            break
    input_half, output_half = DOCUMENT[task]
    halves = (input_half,) if ablation == "decouple" or output_half is None else (input_half, output_half)
    corpus = [[word for half in halves for word in str(item[half]).split()] for item in profile]
    if corpus:
        doc_freq = Counter()
        for document in corpus:
            doc_freq.update(set(document))
        avgdl = np.mean(np.array([len(document) for document in corpus]))
        query_terms, query_counts = np.unique(query, return_counts=True)
        scores = [bm25_score(query_terms, query_counts, document, len(corpus), doc_freq, avgdl)
                  for document in corpus]
    else:
        scores = []
    ranked = sorted(enumerate(scores), key=lambda x: x[1], reverse=True)
    n = len(profile)
    k = int(k * n) if 0 < k < 1 else k
    if target == 0:
        window = ranked[:int(k)]
    else:
        target = target if target >= 1 else int(n * target)
        target = target if target < n else n
        k = k if target + k < n else 0  # a window that reaches the end gives nothing
        window = ranked[int(target):int(target + k)]
    return [profile[i] for i, _ in window]


def random_in_user(rng: random.Random, profile: list, k: int) -> list:
    return profile if len(profile) < k else rng.sample(profile, k)


class Replay:
    """The study's `datasets.map` of a split, replayed for one cell: per example,
    its retrieved items in prompt order. Every part of every split starts from
    the same seeded state, so a split's draws do not depend on the other split;
    the users Full_Random and RanBM25 draw from are train's and dev's examples."""

    def __init__(self, cell, train: list = (), dev: list = ()):
        self.cell = cell
        everyone = [e.profile for e in [*train, *dev]]
        total = sum(len(p) for p in everyone)
        self.profiles, self.weights = everyone, [len(p) / total for p in everyone] if total else []

    def split(self, examples: list) -> list:
        cell, out = self.cell, []
        if cell.retriever == "none" or cell.k == 0:
            return [[] for _ in examples]
        parts = min(PROCESSES, len(examples))
        size, extra = divmod(len(examples), parts) if parts else (0, 0)
        for part in range(parts):
            start = size * part + min(part, extra)
            stop = start + size + (1 if part < extra else 0)
            rng = random.Random(cell.seed)  # the state each forked process starts from
            for first in range(start, stop, BATCH):
                batch = examples[first:min(first + BATCH, stop)]
                out += [self.order(rng, items) for items in self.retrieve(rng, batch)]
        return out

    def sample_users(self, rng: random.Random, per_example: int, batch: int, k: int) -> list:
        """__sample_among_users: reseeded, per_example users for each example of the
        batch, then k items drawn from their pooled profiles."""
        rng.seed(self.cell.seed)
        users = rng.choices(range(len(self.profiles)), weights=self.weights, k=int(batch * per_example))
        pools = []
        for i in range(batch):
            pool = [item for user in users[int(i * per_example):int((i + 1) * per_example)]
                    for item in self.profiles[user]]
            pools.append(random_in_user(rng, pool, k))
        return pools

    def retrieve(self, rng: random.Random, batch: list) -> list:
        cell, task = self.cell, self.cell.task
        # `datasets` hands each batch fresh lists: BM25's pop changes this batch's only.
        profiles = [list(e.profile) for e in batch]
        if cell.retriever == "Full_Random":
            return self.sample_users(rng, cell.k, len(batch), cell.k)
        if cell.retriever == "RanBM25":
            # AVERAGE_NUM: as many users, and items, as LaMP's mean profile holds.
            fakes = self.sample_users(rng, LAMP_PROFILE_SIZE[task], len(batch), LAMP_PROFILE_SIZE[task])
            return [bm25(task, e.input, fake, cell.k, cell.ablation, cell.rank_offset) for e, fake in zip(batch, fakes)]
        if cell.retriever == "Random":
            return [random_in_user(rng, profile, cell.k) for profile in profiles]
        if cell.retriever == "BM25":
            return [bm25(task, e.input, profile, cell.k, cell.ablation, cell.rank_offset)
                    for e, profile in zip(batch, profiles)]
        # Mixed: the input side for the whole batch, then the output side, on the same
        # profile lists (a BM25 side's pop shows in a later Random side).
        sides = [[bm25(task, e.input, profile, cell.k) if side == "BM25" else random_in_user(rng, profile, cell.k)
                  for e, profile in zip(batch, profiles)] for side in (cell.input_retriever, cell.output_retriever)]
        half = DOCUMENT[task][1]
        return [[{**a, half: b[half]} for a, b in zip(inputs, outputs)] for inputs, outputs in zip(*sides)]

    def order(self, rng: random.Random, items: list) -> list:
        """The order the full-item prompts apply; the one-half prompts keep the retrieved order."""
        order = self.cell.order if self.cell.ablation == "both" else "start"
        if not items and self.cell.task != "LaMP_1":  # returned before ordering (LaMP_1 has no such test)
            return items
        if order == "random":  # one seeded shuffle, which also resets the stream later draws come from
            items = list(items)
            rng.seed(self.cell.seed)
            rng.shuffle(items)
            return items
        # reorder_list_middle lays items out as `lamp` does; `end` reverses them.
        return [items[rank] for rank in order_layout(order, len(items), self.cell.seed, "")]


# ----------------------------------------------------------------------------- prompts


def cut(tokenizer, ids: list, trim_length: int) -> str:
    """The study's trim: drop trim_length tokens from the end, then one more, and decode."""
    return tokenizer.decode(ids[:-trim_length][:-1])


def lamp_3_share(tokenizer, task_input: str, max_input: int, task_tokens: int, n: int = 1):
    """LaMP_3's profile budget: it depends on the review's own length."""
    length = len(tokenizer(task_input)["input_ids"])
    if length < task_tokens:
        return (max_input - task_tokens) / n
    return 0 if length > max_input else (max_input - length) / n


def full_items(task: str, items: list, tokenizer, share) -> list:
    template, field, _, _ = ITEM[task]
    pieces = []
    for item in items:
        values = {name: str(value) for name, value in item.items()}
        ids = tokenizer.encode(template.format(**values))
        if len(ids) > share:
            values[field] = cut(tokenizer, tokenizer.encode(values[field]), math.ceil(len(ids) - share))
        pieces.append(template.format(**values))
    return pieces


def join_input(task: str, block: str, task_input: str) -> str:
    joiner = ITEM[task][3]
    if joiner is None:  # LaMP_1: after every `title "..."`, with a space
        return re.sub(r'title "([^"]*)"', lambda m: f'title "{m.group(1)}" {block}', task_input)
    return block + joiner + task_input


def render_study(task: str, task_input: str, items: list, ablation: str, tokenizer, max_input: int) -> tuple:
    """(prompt, the pieces of its profile block): the string the study builds."""
    task_tokens = max_input // 2
    if not items:
        return task_input, []
    if ablation == "both":
        held_back = ITEM[task][2]
        share = (lamp_3_share(tokenizer, task_input, max_input, task_tokens, len(items)) if task == "LaMP_3"
                 else (max_input - task_tokens - held_back) / len(items))
        pieces = full_items(task, items, tokenizer, share)
        return join_input(task, ", and ".join(pieces), task_input), pieces
    lead, field, tail, held_back, test_slack, cut_slack = ABLATION[(task, SHOWN_HALF[ablation])]
    budget = (lamp_3_share(tokenizer, task_input, max_input, task_tokens) if task == "LaMP_3"
              else max_input - task_tokens - held_back)
    pieces = [str(item[field]) if (task, field) == ("LaMP_3", "score") else f'"{item[field]}"' for item in items]
    block = lead + (", " if (task, field) == ("LaMP_3", "score") else "").join(pieces)
    ids = tokenizer.encode(block)
    if len(ids) + test_slack > budget:
        block = cut(tokenizer, ids, math.ceil(len(ids) - budget + cut_slack))
    return join_input(task, block + tail, task_input), pieces


def study_prompt(task: str, task_input: str, items: list, ablation: str, tokenizer, max_input: int) -> Prompt:
    """The study's prompt, and what of it the model receives after the tokenizer's cut:
    the items whose whole text is in it, and whether the task input lost its tail."""
    text, pieces = render_study(task, task_input, items, ablation, tokenizer, max_input)
    # The cut keeps the first max_input tokens, special tokens included: one encoding says where it falls.
    ends = [end for _, end in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    room = max_input - tokenizer.num_special_tokens_to_add()
    cut_input = len(ends) > room
    kept = text[:ends[room - 1] if room > 0 else 0] if cut_input else text
    shown, at = 0, 0
    for piece in pieces:
        at = kept.find(piece, at)
        if at < 0:
            break
        shown, at = shown + 1, at + len(piece)
    return Prompt(text, items[:shown], cut_input)


# ----------------------------------------------------------------------------- Llama-2-7b-chat

CHAT_ANCHOR = {"LaMP_4": "the following article:", "LaMP_5": "the following abstract of a paper:",
               "LaMP_7": "the following tweet without any explanation before or after it:"}


def chat_input(task: str, prompt: str, tokenizer, max_input: int = CHAT_TOKENS) -> str:
    """LlamaDatasets' input: generation tasks quote the text after their anchor;
    then the tokenizer's cut, decoded back to text; then Eval_Llama2's `\nAnswer:`."""
    if task in CHAT_ANCHOR:
        anchor = CHAT_ANCHOR[task]
        parts = prompt.split(anchor)
        prompt = parts[0] + " " + anchor + ' "' + parts[1] + '"'
    return tokenizer.decode(tokenizer(prompt, max_length=max_input, truncation=True)["input_ids"]) + "\nAnswer:"


def chat_answer(generated: str) -> str:
    """Eval_Llama2's reading of a generation: the first line after the last `Answer:`, unquoted."""
    return generated.split("Answer:")[-1].strip().split("\n")[0].strip().strip('"')


# ----------------------------------------------------------------------------- the recipe


def study_tokenizer(counter):
    """The study cut its prompts with the model's own tokenizer: there is no study prompt without one."""
    if not hasattr(counter, "tokenizer"):
        raise LampError("recipe study builds its prompts with a model's tokenizer: name a model (--model)")
    return counter.tokenizer


class StudyRecipe:
    """The study's code, reproduced: the Recipe of lamp.recipes."""

    name = "study"
    reads_rankings = False  # its draws run through whole splits in file order, as it renders
    seeds_every_render = True  # its renders are never shared across seeds: every draw runs through one seeded stream

    def check(self, cell) -> None:
        """Refuses, in one line, a cell the study's code never built, or cannot run."""
        check_cell(cell.task, cell.retriever, cell.k, cell.ablation, cell.order, cell.rank_offset,
                   cell.input_retriever, cell.output_retriever, offset_share=True)
        retriever, ablation = cell.retriever, cell.ablation
        if retriever == "Recency" or cell.use_date:
            raise LampError("recipe study has no " + ("Recency retriever" if retriever == "Recency" else "use_date")
                            + " (LaMP's code has; the study's has not): run it with recipe lamp")
        if retriever in DENSE:
            raise LampError(f"recipe study never ran {retriever}: give recipe lamp")
        if ablation != "both" and (cell.task, SHOWN_HALF[ablation]) not in ABLATION:
            raise LampError(f"recipe study has no {ablation} prompts for {cell.task} (it ablated LaMP_2-5 only)")
        if ablation != "both" and cell.order != "start":
            raise LampError(f"recipe study's {ablation} prompts ignore the order; give order start, not {cell.order!r}")
        if cell.rank_offset and retriever not in ("BM25", "RanBM25"):
            raise LampError(f"recipe study takes a rank offset for BM25 and RanBM25 only, not {retriever}")
        if isinstance(cell.k, float) and retriever not in ("BM25", "RanBM25"):
            raise LampError(f"recipe study draws a whole number of items for {retriever} (random.sample); "
                            f"a fractional k ({cell.k}) is for BM25 and RanBM25")
        if retriever == "Mixed":
            if ablation != "both":
                raise LampError("recipe study runs Mixed with ablation both only (its argument parser asserts it)")
            for side in (cell.input_retriever, cell.output_retriever):
                if side not in ("BM25", "Random"):
                    raise LampError(f"recipe study's Mixed takes BM25 or Random on each side, not {side!r} "
                                    "(its Full_Random side calls the user sampler with an argument missing)")

    def retrieve(self, cell, examples: list, limit: int | None = None, pool=None, train: list = (),
                 dev: list = ()) -> list:
        """The items of examples[:limit], in prompt order: the draws replayed over the
        whole split; other users' items drawn from train's and dev's examples."""
        return Replay(cell, train, dev).split(examples)[:limit]

    def prompts(self, cell, examples: list, items: list, counter, max_tokens: int) -> list:
        tokenizer = study_tokenizer(counter)
        return [study_prompt(cell.task, example.input, shown, cell.ablation, tokenizer, max_tokens)
                for example, shown in zip(examples, items)]

    def prompt_tokens(self, decoder_only: bool, max_tokens: int) -> int:
        """The study built its Llama-2 prompts for 3000 tokens."""
        return CHAT_TOKENS if decoder_only else max_tokens

    def model_inputs(self, tokenizer, task: str, prompts: list, max_tokens: int, decoder_only: bool) -> tuple:
        """Prompts cut to max_tokens by the tokenizer, as the study's were; a
        decoder-only model reads them as the study's Llama-2-7b-chat did."""
        if decoder_only:
            texts = [chat_input(task, prompt, tokenizer) for prompt in prompts]
            return texts, tokenizer(texts)["input_ids"]
        return prompts, tokenizer(prompts, max_length=max_tokens, truncation=True)["input_ids"]

    def decoding(self, task: str, beams: int, decoder_only: bool) -> dict:
        """A decoder-only model decodes as the study's Llama-2-7b-chat did: sampling beam search, 128 new tokens."""
        if decoder_only:
            return {"num_beams": 4, "do_sample": True, "max_new_tokens": CHAT_NEW_TOKENS}
        return {"num_beams": beams, "max_new_tokens": get_task(task).max_new_tokens}

    def answer(self, generated: str, decoder_only: bool) -> str:
        return chat_answer(generated) if decoder_only else generated.strip()
