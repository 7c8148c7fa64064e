"""The study's retrievers (docs/design.md §4), split into ranking and selecting.

A *ranking* is every candidate for one example, most relevant first; a cell's
k, fraction and rank_offset only *select* a window of it, and Mixed pairs two
windows. So rankings can be computed once, stored, and sliced for every cell.

Every random draw comes from `example_rng(seed, example.id, purpose)`, and the
item pool is laid out independently of example order, so an example's items
never depend on which other examples were processed, or in what order.
"""

import itertools
import math
import numbers
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lamp.errors import LampError, data_error
from lamp.seeding import example_rng
from lamp.tasks import get_task

RETRIEVERS = ("none", "BM25", "Random", "Full_Random", "RanBM25", "Mixed", "Recency", "Contriever")
# The retrievers that rank by the items' text, which `use_date` extends with each item's date.
TEXT_RANKED = ("BM25", "RanBM25")
# Retrievers that rank by an encoder's embeddings, computed in `prepare` (grid/embed.py).
DENSE = ("Contriever",)
MIXED_SIDES = ("BM25", "Random", "Full_Random")
ABLATIONS = ("both", "only_output", "decouple", "only_input")
ORDERS = ("start", "end", "middle", "random")

# LaMP_1's input quotes the paper title and the two references (docs/design.md §1). Greedy
# groups between the fixed phrases keep titles that themselves contain quotes.
_LAMP_1 = re.compile(r'title "(.*)", which reference.*\[1\]: "(.*)" \[2\]: "(.*)"', re.S)


# ----------------------------------------------------------------------------- query


def lamp_1_titles(input_text: str) -> tuple[str, str, str]:
    """The paper title and the references [1] and [2] quoted in a LaMP_1 input."""
    match = _LAMP_1.search(input_text)
    if match is None:
        raise LampError(f"LaMP_1 input does not quote a title and references [1], [2]: {input_text[:80]!r}")
    return match.groups()


def extract_query(task: str, input_text: str) -> str:
    """The BM25 query: LaMP_1's quoted titles, else the text after the task's anchor."""
    if task == "LaMP_1":
        return " ".join(lamp_1_titles(input_text)).strip()
    anchor = get_task(task).query_anchor
    _, found, query = input_text.partition(anchor)
    if not found:
        raise LampError(f"{task} input has no {anchor!r} to take the query after: {input_text[:80]!r}")
    return query.strip()


# ----------------------------------------------------------------------------- BM25


def bm25_scores(query: list[str], documents: list[list[str]], k1=1.5, b=0.75, epsilon=0.25) -> np.ndarray:
    """rank_bm25's BM25Okapi(documents).get_scores(query), bit for bit, vectorized.

    Bit-exact so that ties, and so rankings, are the reference's. That is why
    idf uses math.log, the idf mean is a sequential sum in first-seen word order
    (as rank_bm25 accumulates it), and the query terms are added one by one.
    """
    n = len(documents)
    # Each word's id is where it first occurs; made dense, ids keep first-seen
    # order. map/chain keep this per-token loop in C: it dominates the cost.
    first = {}
    tokens = itertools.chain.from_iterable(documents)
    positions = np.fromiter(map(first.setdefault, tokens, itertools.count()), dtype=np.int64)
    if not first:  # no documents or only empty ones: rank_bm25 divides by zero here
        return np.zeros(n)
    is_first = positions == np.arange(len(positions))
    words = (np.cumsum(is_first) - 1)[positions]
    vocab = dict(zip(first, range(len(first))))  # word -> dense id; dicts keep first-seen order
    doc_len = np.array([len(d) for d in documents])
    avgdl = int(doc_len.sum()) / n

    # Term frequency of every (document, word) pair that occurs, and document frequency.
    pairs, tf = np.unique(np.repeat(np.arange(n), doc_len) * len(vocab) + words, return_counts=True)
    pair_doc, pair_word = np.divmod(pairs, len(vocab))
    df = np.bincount(pair_word, minlength=len(vocab))

    df_values, df_index = np.unique(df, return_inverse=True)
    idf = np.array([math.log(n - d + 0.5) - math.log(d + 0.5) for d in df_values.tolist()])[df_index]
    # Words in more than half the documents have negative idf: floor it at epsilon * mean idf.
    idf[idf < 0] = epsilon * (np.cumsum(idf)[-1] / len(idf))

    # Dense term frequencies for the query's distinct known words only.
    query_words = [vocab[t] for t in query if t in vocab]
    column = np.full(len(vocab), -1)
    distinct = list(dict.fromkeys(query_words))
    column[distinct] = np.arange(len(distinct))
    query_tf = np.zeros((n, len(distinct)), dtype=np.int64)
    hit = column[pair_word] >= 0
    query_tf[pair_doc[hit], column[pair_word[hit]]] = tf[hit]

    norm = k1 * (1 - b + b * doc_len / avgdl)
    score = np.zeros(n)
    for w in query_words:  # repeated query words count again, as in rank_bm25
        f = query_tf[:, column[w]]
        score += idf[w] * (f * (k1 + 1) / (f + norm))
    return score


def document_text(task: str, item: dict, by_input: bool = False, use_date: bool = False) -> str:
    """What BM25 indexes and Contriever embeds: the full item, or its input half alone
    (`decouple`); with use_date, followed by ` date: ` and the item's date, as LaMP's
    rank_profiles builds its corpus with --use_date (docs/design.md §4)."""
    spec = get_task(task)
    if spec.input_half is None:  # LaMP_7: the output half is all there is
        text = str(item[spec.output_half])
    elif by_input:
        text = str(item[spec.input_half])
    else:
        text = f"{item[spec.input_half]} {item[spec.output_half]}"
    return f"{text} date: {item['date']}" if use_date else text


def date_key(date) -> tuple:
    """A profile item's date as LaMP's code compares it: the integers between its
    dashes ("2013-05-21" -> (2013, 5, 21), "2009" -> (2009,)). ValueError if it has others."""
    return tuple(int(part) for part in str(date).split("-"))


def check_dates(path, example_id: str, profile: list, parsed: bool) -> None:
    """Refuses, naming the file, example, item and field, a profile item without a
    date, or (parsed: Recency sorts by it) with one date_key cannot read."""
    for index, item in enumerate(profile):
        date = item.get("date")
        if date is None:
            raise data_error(path, f"item {item['id']!r} has no date (Recency and use_date need one)",
                             example_id=example_id, field=f"profile[{index}].date")
        if parsed and not is_date(date):
            raise data_error(path, f"item {item['id']!r}: date {date!r} is not whole numbers joined by '-' "
                                   "(LaMP's dates: 2013-05-21, 2009)",
                             example_id=example_id, field=f"profile[{index}].date")


def is_date(date) -> bool:
    """Whether date_key reads the date."""
    try:
        date_key(date)
    except ValueError:
        return False
    return True


def drop_query_items(task: str, items: list[dict], input_text: str) -> list[dict]:
    """The leakage guard: the profile item the example was made from goes. LaMP_1:
    the item whose title is the paper's title, as the study and LaMP compare;
    elsewhere the item whose input half (LaMP_7: text) is the query itself."""
    if task == "LaMP_1":
        half, query = "title", lamp_1_titles(input_text)[0].strip()
    else:
        spec = get_task(task)
        half, query = spec.input_half or spec.output_half, extract_query(task, input_text)
    return [item for item in items if str(item[half]).strip() != query]


@dataclass(frozen=True, slots=True)
class Ranking:
    items: list[dict]  # every candidate, most relevant first
    scores: np.ndarray | None  # BM25 or dot-product scores in that order; None for random orders


def bm25_ranking(task: str, query: str, items: list[dict], by_input: bool = False, use_date: bool = False) -> Ranking:
    """items sorted by BM25 against the query; ties keep their given order."""
    documents = [document_text(task, item, by_input, use_date).split() for item in items]
    scores = bm25_scores(query.split(), documents)
    order = np.argsort(-scores, kind="stable")
    return Ranking([items[i] for i in order], scores[order])


def recency_ranking(items: list[dict]) -> Ranking:
    """items newest first by date_key, ties by id: LaMP's recency ranker, whose
    ties would follow the profile's order, made independent of it."""
    by_id = sorted(items, key=lambda item: item["id"])
    return Ranking(sorted(by_id, key=lambda item: date_key(item["date"]), reverse=True), None)  # a stable sort


def dense_ranking(task: str, example, query_embedding: np.ndarray, item_embeddings: np.ndarray) -> Ranking:
    """Contriever (docs/design.md §4): the example's own items by the dot product of
    their embedding with the query's, the leakage guard applied; ties keep profile
    order. item_embeddings: one row per profile item, in profile order."""
    kept = {id(item) for item in drop_query_items(task, example.profile, example.input)}
    positions = [p for p, item in enumerate(example.profile) if id(item) in kept]
    scores = item_embeddings[positions] @ query_embedding
    order = np.argsort(-scores, kind="stable")
    return Ranking([example.profile[positions[i]] for i in order], scores[order])


# ----------------------------------------------------------------------------- other users


class ItemPool:
    """Every profile item of a split, grouped by user, for drawing other users' items.

    Users are sorted, and each user's items (deduplicated by id: time-based
    splits repeat a user's items across examples; the first seen is kept)
    sorted by id, so the layout, and so every draw, is the same whatever order
    the examples came in.

    The pool holds no items: a slot is an item's place, (row, pos): the example
    at `row` (in the order the pool was built from) and the position in its
    profile, and `fetch` turns slots into items. ItemPool(examples) fetches from
    the examples in memory; ItemPool.from_ids lays a pool out from the users
    and item ids alone and fetches through a function (a Parquet file read on
    demand, say), so a pool over millions of items takes a few bytes each.
    """

    def __init__(self, examples):
        examples = list(examples)
        ids = pa.array([str(item["id"]) for example in examples for item in example.profile], pa.string())
        self._lay_out([example.user for example in examples], [len(example.profile) for example in examples], ids)
        self._items = lambda rows, positions: [examples[r].profile[p] for r, p in zip(rows, positions)]

    @classmethod
    def from_ids(cls, users, sizes, ids, items) -> "ItemPool":
        """A pool laid out from, per example row, its user and profile size, and
        every profile item's id, row after row (a pyarrow string array). items(rows,
        positions) fetches the items at those places, in that order."""
        pool = cls.__new__(cls)
        pool._lay_out(list(users), sizes, ids)
        pool._items = items
        return pool

    def _lay_out(self, users: list, sizes, ids) -> None:
        sizes = np.asarray(sizes, dtype=np.int64)
        if len(ids) != int(sizes.sum()):
            raise LampError(f"an item pool needs every profile item's id: {len(ids)} ids for {int(sizes.sum())} items")
        names = sorted(set(users))
        code = dict(zip(names, range(len(names))))
        owner = np.repeat(np.fromiter(map(code.__getitem__, users), dtype=np.int64, count=len(users)), sizes)
        # A stable sort by (user, id) keeps each item's first occurrence first among its
        # duplicates. Arrow compares strings by their UTF-8 bytes: Python's order of str.
        order = pc.sort_indices(pa.table({"owner": owner, "id": ids}),
                                sort_keys=[("owner", "ascending"), ("id", "ascending")]).to_numpy()
        owner, ids = owner[order], pc.take(ids, order)
        first = np.ones(len(order), dtype=bool)  # the first of its (user, id) in that order
        if len(order) > 1:
            same_id = pc.equal(ids.slice(1), ids.slice(0, len(order) - 1)).to_numpy(zero_copy_only=False)
            first[1:] = (owner[1:] != owner[:-1]) | ~same_id.astype(bool)
        del ids
        bounds = np.searchsorted(owner[first], np.arange(len(names) + 1)).tolist()
        del owner
        flat = order[first]  # per slot: its item's index among all items, example after example
        del order, first
        starts = np.concatenate([[0], np.cumsum(sizes)])
        self.row = np.searchsorted(starts, flat, side="right") - 1  # the example...
        self.pos = (flat - starts[self.row]).astype(np.int32)  # ...and the position in its profile
        self.span = {user: (bounds[i], bounds[i + 1]) for i, user in enumerate(names)}  # user -> its slots
        self.mean_profile_size = int(sizes.sum()) / len(sizes) if len(sizes) else 0.0

    def __len__(self) -> int:
        return len(self.row)

    @property
    def nbytes(self) -> int:
        """What the pool's slot arrays take; the items themselves stay where they are."""
        return self.row.nbytes + self.pos.nbytes

    def fetch(self, slots) -> list[dict]:
        """The items in these slots, in their order."""
        slots = np.asarray(slots, dtype=np.int64)
        return self._items(self.row[slots].tolist(), self.pos[slots].tolist())

    @property
    def items(self) -> list[dict]:
        """Every item, slot by slot (all of them fetched)."""
        return self.fetch(np.arange(len(self)))

    def draw(self, user: str, n: int, rng: np.random.Generator) -> np.ndarray:
        """The slots of n items of users other than `user`, uniform over items,
        without replacement.

        Uniform over items is the same as drawing users in proportion to their
        profile size. Draws come in fixed-size batches, so the first m of n
        items are exactly the items drawn for m: a stored long draw can be cut.
        """
        start, stop = self.span.get(user, (0, 0))
        others = len(self) - (stop - start)
        n = min(n, others)
        picked = {}  # an ordered set of indices into the items of other users
        while len(picked) < n:
            for i in rng.integers(others, size=64).tolist():
                picked.setdefault(i)
                if len(picked) == n:
                    break
        index = np.fromiter(picked, dtype=np.int64, count=len(picked))
        index[index >= start] += stop - start  # skip over the user's own items
        return index

    def sample(self, user: str, n: int, rng: np.random.Generator) -> list[dict]:
        """The items of draw(user, n, rng)."""
        return self.fetch(self.draw(user, n, rng))


# ----------------------------------------------------------------------------- rankings


def pool_draw(example, retriever: str, pool: ItemPool, seed: int = 0, size: int | None = None) -> np.ndarray:
    """The pool slots an other-user retriever draws for an example, as `rank` draws
    them: Full_Random `size` items (by default as many as the user's own profile
    holds), RanBM25 a fake profile of the data set's average size."""
    if retriever == "RanBM25":
        n = round(pool.mean_profile_size)
    else:
        n = len(example.profile) if size is None else size
    return pool.draw(example.user, n, example_rng(seed, example.id, retriever))


def rank(task: str, example, retriever: str, *, by_input: bool = False, use_date: bool = False, seed: int = 0,
         pool: ItemPool | None = None, size: int | None = None, embeddings: tuple | None = None) -> Ranking:
    """The full ranking one retriever gives one example (the leakage guard applied).

    by_input: BM25 over input halves alone (the `decouple` ablation).
    use_date: BM25 over texts that end with the item's date (LaMP's --use_date).
    size: how many items Full_Random draws. The default, the user's own profile
    size, is what cells use, so Full_Random offers as many candidates as the
    user's own profile does; the other retrievers rank their whole candidate set.
    embeddings: Contriever's (query, items) embeddings of the example, which
    `prepare` computes (over input halves where by_input).
    """
    query = extract_query(task, example.input)
    if retriever in DENSE:
        if embeddings is None:
            raise LampError(f"{retriever} ranks by embeddings that `prepare` computes: run it through a grid "
                            "(`prepare --grid` or `run`)")
        return dense_ranking(task, example, *embeddings)
    if retriever == "BM25":
        return bm25_ranking(task, query, drop_query_items(task, example.profile, example.input), by_input, use_date)
    if retriever == "Recency":
        return recency_ranking(drop_query_items(task, example.profile, example.input))
    if retriever == "Random":
        own = drop_query_items(task, example.profile, example.input)
        order = example_rng(seed, example.id, "Random").permutation(len(own))
        return Ranking([own[i] for i in order], None)
    if retriever not in ("Full_Random", "RanBM25"):
        raise LampError(f"no ranking for retriever {retriever!r}; ranked ones: BM25, Random, Full_Random, RanBM25, "
                        f"Recency, {', '.join(DENSE)}")
    if pool is None:
        raise LampError(f"{retriever} draws other users' items: it needs an ItemPool of the split")
    drawn = pool.fetch(pool_draw(example, retriever, pool, seed, size))
    if retriever == "Full_Random":
        return Ranking(drop_query_items(task, drawn, example.input), None)
    # RanBM25: a fake profile of the data set's average size, then BM25 over it.
    return bm25_ranking(task, query, drop_query_items(task, drawn, example.input), by_input, use_date)


# ----------------------------------------------------------------------------- selecting


def resolve_k(k: int | float, profile_size: int) -> int:
    """k items: a whole k as is, a fraction of the user's own profile size."""
    return int(k) if isinstance(k, numbers.Integral) else int(k * profile_size)


def pair_mixed(task: str, input_items: list[dict], output_items: list[dict]) -> list[dict]:
    """Mixed: each input-side item, keeping its id, with its partner's output half."""
    half = get_task(task).output_half
    return [{**item, half: partner[half]} for item, partner in zip(input_items, output_items)]


def ranked_sides(retriever: str, input_retriever: str | None = None,
                 output_retriever: str | None = None) -> tuple:
    """The rankings a retriever reads: none for `none`, two for Mixed."""
    if retriever == "none":
        return ()
    if retriever == "Mixed":
        return (input_retriever, output_retriever)
    return (retriever,)


def select(task: str, retriever: str, ranked: dict, k: int | float, rank_offset: int, profile_size: int,
           input_retriever: str | None = None, output_retriever: str | None = None) -> list[dict]:
    """Ranks [rank_offset, rank_offset + k) of each ranking in `ranked` (retriever
    name -> items, most relevant first); for Mixed, the two windows paired."""
    if retriever == "none":
        return []
    n = resolve_k(k, profile_size)
    window = slice(rank_offset, rank_offset + n)
    if retriever != "Mixed":
        return ranked[retriever][window]
    output_window = window
    if input_retriever == output_retriever != "BM25":
        # Two draws of one random retriever: the output halves come from the next
        # n ranks of its permutation, a draw of their own that never repeats an item.
        output_window = slice(rank_offset + n, rank_offset + 2 * n)
    return pair_mixed(task, ranked[input_retriever][window], ranked[output_retriever][output_window])


def reach(retriever: str, k: int | float, rank_offset: int, profile_size: int) -> int:
    """How far down its rankings a cell's window can read."""
    n = resolve_k(k, profile_size)
    return rank_offset + (2 * n if retriever == "Mixed" else n)


def retrieve(task: str, example, retriever: str, k: int | float, *, ablation: str = "both",
             rank_offset: int = 0, seed: int = 0, pool: ItemPool | None = None,
             input_retriever: str | None = None, output_retriever: str | None = None,
             use_date: bool = False) -> list[dict]:
    """The profile items a cell shows for one example, most relevant first.

    Only `decouple` (BM25 over input halves) and use_date change the ranking.
    Assumes check_cell passed.
    """
    ranked = {name: rank(task, example, name, by_input=ablation == "decouple", use_date=use_date, seed=seed,
                         pool=pool).items
              for name in ranked_sides(retriever, input_retriever, output_retriever)}
    return select(task, retriever, ranked, k, rank_offset, len(example.profile),
                  input_retriever, output_retriever)


# ----------------------------------------------------------------------------- checking


def check_cell(task: str, retriever: str, k: int | float, ablation: str = "both", order: str = "start",
               rank_offset: int | float = 0, input_retriever: str | None = None,
               output_retriever: str | None = None, offset_share: bool = False, use_date: bool = False) -> None:
    """Refuse, in one line, a grid cell that cannot run, before any work starts.
    offset_share: whether rank_offset may also be a share of the profile (the study's may)."""
    spec = get_task(task)
    check_dated(spec, retriever, use_date)
    if use_date and not {retriever, input_retriever, output_retriever} & set(TEXT_RANKED):
        raise LampError(f"use_date adds the date to the text that {', '.join(TEXT_RANKED)} rank; "
                        f"{retriever} reads no text")
    for what, value, valid in (("retriever", retriever, RETRIEVERS),
                               ("ablation", ablation, ABLATIONS), ("order", order, ORDERS)):
        if value not in valid:
            raise LampError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise LampError(f"k must be a whole number of items or a fraction in (0, 1), got {k!r}")
    if isinstance(k, numbers.Integral) and k < 0:
        raise LampError(f"k must be >= 0, got {k}")
    if not isinstance(k, numbers.Integral) and not 0 < k < 1:
        raise LampError(f"a fractional k must lie in (0, 1) of the profile, got {k}; give whole k as an integer")
    share = offset_share and isinstance(rank_offset, float) and 0 < rank_offset < 1
    if isinstance(rank_offset, bool) or not (isinstance(rank_offset, numbers.Integral) or share) or rank_offset < 0:
        raise LampError(f"rank_offset must be a whole number >= 0{' or a share in (0, 1)' if offset_share else ''}"
                        f", got {rank_offset!r}")
    if spec.input_half is None and ablation != "both":
        raise LampError(f"{task} items have only an output half: ablation must be 'both', got {ablation!r}")
    if retriever != "Mixed":
        if input_retriever is not None or output_retriever is not None:
            raise LampError(f"input_retriever / output_retriever are for Mixed only, not {retriever}")
    else:
        if spec.input_half is None or task == "LaMP_1":
            raise LampError(f"Mixed swaps output halves between items; {task} has no "
                            + ("input half to keep" if spec.input_half is None else "label-like output half to swap"))
        for side, name in (("input_retriever", input_retriever), ("output_retriever", output_retriever)):
            if name not in MIXED_SIDES:
                raise LampError(f"Mixed needs {side} in {', '.join(MIXED_SIDES)}, got {name!r}")


def check_dated(spec, retriever: str, use_date: bool) -> None:
    """Refuses a cell that reads profile items' dates where its task's items carry none
    (TaskSpec.dated)."""
    if (retriever == "Recency" or use_date) and not spec.dated:
        raise LampError(f"{spec.name}'s profile items carry no date: "
                        + ("Recency ranks by it" if retriever == "Recency" else "use_date shows it to BM25"))
