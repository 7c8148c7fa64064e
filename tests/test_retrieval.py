import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from rank_bm25 import BM25Okapi

from lamp.data import Example
from lamp.errors import LampError
from lamp.retrieval import (
    ItemPool,
    bm25_ranking,
    bm25_scores,
    check_cell,
    extract_query,
    lamp_1_titles,
    rank,
    retrieve,
)
from lamp.tasks import TASKS


def task_input(task, text):
    """A task input in the data set's own wording, with `text` as its content."""
    if task == "LaMP_1":
        return TASKS[task].input_template.format(title=text, ref1="ref one", ref2="ref two")
    return TASKS[task].input_template.format(text)


def make_example(task, text, profile, id="q0", user="u0"):
    return Example(id=id, user=user, input=task_input(task, text), profile=profile, output=None)


def lamp_2_item(id, description, tag):
    return {"id": id, "description": description, "tag": tag}


# ----------------------------------------------------------------------------- query


@pytest.mark.parametrize("task", ["LaMP_2", "LaMP_3", "LaMP_4", "LaMP_5", "LaMP_7"])
def test_query_is_the_text_after_the_anchor(task):
    assert extract_query(task, task_input(task, "  a: b description: c  ")) == "a: b description: c"


def test_lamp_1_query_is_the_quoted_titles():
    text = TASKS["LaMP_1"].input_template.format(title='The "quoted" paper', ref1="Ref A", ref2="Ref B")
    assert lamp_1_titles(text) == ('The "quoted" paper', "Ref A", "Ref B")
    assert extract_query("LaMP_1", text) == 'The "quoted" paper Ref A Ref B'


def test_missing_anchor_is_refused():
    with pytest.raises(LampError, match="review:"):
        extract_query("LaMP_3", "no anchor here")
    with pytest.raises(LampError, match="LaMP_1"):
        extract_query("LaMP_1", "no quotes here")


# ----------------------------------------------------------------------------- BM25


def random_corpus(rng, n_docs, vocab_size):
    words = [f"w{i}" for i in range(vocab_size)]
    docs = [[rng.choice(words) for _ in range(rng.randint(0, 12))] for _ in range(n_docs)]
    query = [rng.choice(words + ["unseen"]) for _ in range(rng.randint(0, 8))]
    return query, docs


def test_bm25_scores_equal_rank_bm25_bit_for_bit():
    rng = random.Random(0)
    negative_idf_seen = 0
    for trial in range(2000):
        # Tiny corpora and tiny vocabularies make words appear in over half the
        # documents (negative idf, floored) and make equal scores common.
        query, docs = random_corpus(rng, rng.randint(1, 3 if trial % 2 else 40), rng.randint(1, 30))
        if not any(docs):
            continue  # rank_bm25 divides by zero on an empty vocabulary
        reference = BM25Okapi(docs)
        negative_idf_seen += any(v < 0 for v in reference.idf.values()) or reference.average_idf < 0
        expected = reference.get_scores(query)
        got = bm25_scores(query, docs)
        np.testing.assert_array_equal(got, expected)
        assert list(np.argsort(-got, kind="stable")) == list(np.argsort(-expected, kind="stable"))
    assert negative_idf_seen > 100


def test_bm25_of_nothing_is_nothing():
    assert bm25_scores(["a"], []).shape == (0,)
    np.testing.assert_array_equal(bm25_scores(["a"], [[], []]), [0.0, 0.0])


def test_ties_keep_profile_order():
    profile = [lamp_2_item(str(i), "filler text", "comedy") for i in range(5)]
    profile[1:1] = [lamp_2_item("a", "words filler", "comedy")]
    profile[3:3] = [lamp_2_item("best", "words here", "comedy"), lamp_2_item("b", "words filler", "comedy")]
    ranking = bm25_ranking("LaMP_2", "words here", profile)
    assert [item["id"] for item in ranking.items] == ["best", "a", "b", "0", "1", "2", "3", "4"]
    assert ranking.scores[0] > ranking.scores[1] == ranking.scores[2] > ranking.scores[3] == ranking.scores[-1]


def test_bm25_ranking_matches_rank_bm25_on_full_items():
    rng = random.Random(1)
    for _ in range(200):
        profile = [lamp_2_item(str(i), " ".join(rng.choices("abcdef", k=rng.randint(1, 6))), rng.choice("xy"))
                   for i in range(rng.randint(1, 10))]
        query = " ".join(rng.choices("abcdefg", k=3))
        expected = BM25Okapi([f"{p['description']} {p['tag']}".split() for p in profile]).get_scores(query.split())
        order = np.argsort(-expected, kind="stable")
        assert bm25_ranking("LaMP_2", query, profile).items == [profile[i] for i in order]


def test_leakage_guard_drops_the_query_item():
    profile = [lamp_2_item("leak", "the exact movie", "comedy"), lamp_2_item("a", "a movie", "action"),
               lamp_2_item("b", "another film", "classic")]
    example = make_example("LaMP_2", "the exact movie", profile)
    ids = [item["id"] for item in rank("LaMP_2", example, "BM25").items]
    assert ids == ["a", "b"]
    assert "leak" not in [item["id"] for item in rank("LaMP_2", example, "Random").items]
    tweet = make_example("LaMP_7", "hello world", [{"id": "1", "text": "hello world"}, {"id": "2", "text": "hi"}])
    assert [item["id"] for item in rank("LaMP_7", tweet, "BM25").items] == ["2"]


def test_decouple_ranks_by_the_input_half_alone():
    profile = [lamp_2_item("by_tag", "nothing relevant", "comedy"), lamp_2_item("by_text", "a comedy film", "x"),
               lamp_2_item("other", "unrelated plot", "y")]
    example = make_example("LaMP_2", "comedy comedy", profile)
    assert retrieve("LaMP_2", example, "BM25", 1)[0]["id"] == "by_tag"
    assert retrieve("LaMP_2", example, "BM25", 1, ablation="decouple")[0]["id"] == "by_text"


# ----------------------------------------------------------------------------- selecting


def ranked_example():
    profile = [lamp_2_item(str(i), "word " * i, f"t{i}") for i in range(1, 8)]  # more "word", more relevant
    return make_example("LaMP_2", "word unseen", profile)


def test_k_takes_the_top_and_rank_offset_shifts_the_window():
    example = ranked_example()
    full = [item["id"] for item in rank("LaMP_2", example, "BM25").items]
    assert full == ["7", "6", "5", "4", "3", "2", "1"]
    assert [i["id"] for i in retrieve("LaMP_2", example, "BM25", 2)] == ["7", "6"]
    assert [i["id"] for i in retrieve("LaMP_2", example, "BM25", 2, rank_offset=3)] == ["4", "3"]
    assert [i["id"] for i in retrieve("LaMP_2", example, "BM25", 3, rank_offset=5)] == ["2", "1"]
    assert retrieve("LaMP_2", example, "BM25", 0) == []
    assert retrieve("LaMP_2", example, "none", 0) == []


@pytest.mark.parametrize("fraction, n", [(0.1, 0), (0.15, 1), (0.5, 3), (0.99, 6)])
def test_fraction_of_the_own_profile(fraction, n):
    example = ranked_example()  # 7 items
    got = retrieve("LaMP_2", example, "BM25", fraction)
    assert [i["id"] for i in got] == ["7", "6", "5", "4", "3", "2"][:n]


# ----------------------------------------------------------------------------- other users


def make_split(sizes, task="LaMP_2", seed=0):
    """One example per user; item ids name their user, so ownership is checkable."""
    rng = random.Random(seed)
    examples = []
    for u, size in enumerate(sizes):
        profile = [lamp_2_item(f"u{u}-{i}", " ".join(rng.choices("abcdefgh", k=4)), rng.choice("xyz"))
                   for i in range(size)]
        examples.append(make_example(task, " ".join(rng.choices("abcdefgh", k=3)), profile,
                                     id=f"q{u}", user=f"u{u}"))
    return examples


def owner(item):
    return item["id"].split("-")[0]


def test_other_user_retrievers_never_return_own_items():
    rng = random.Random(2)
    examples = make_split([rng.randint(0, 30) for _ in range(60)])
    # Time-based splits: one user, several examples; none may see that user's items.
    examples.append(make_example("LaMP_2", "a b c", examples[0].profile[:3], id="q0-late", user="u0"))
    pool = ItemPool(examples)
    for seed in range(5):
        for example in examples:
            for retriever in ("Full_Random", "RanBM25"):
                items = rank("LaMP_2", example, retriever, seed=seed, pool=pool, size=40).items
                assert items and all(owner(item) != example.user for item in items)


def test_ranbm25_fake_profile_has_the_average_size_and_is_bm25_ranked():
    examples = make_split([2, 3, 4, 8, 9])  # mean 5.2 -> 5
    pool = ItemPool(examples)
    assert pool.mean_profile_size == pytest.approx(5.2)
    for example in examples:
        ranking = rank("LaMP_2", example, "RanBM25", pool=pool)
        assert len(ranking.items) == 5
        assert list(ranking.scores) == sorted(ranking.scores, reverse=True)


def test_full_random_is_uniform_over_items():
    # Users drawn in proportion to profile size: u1 has 10x u0's items.
    examples = make_split([5, 50, 20, 30])
    pool = ItemPool(examples)
    asker = examples[3]
    counts = Counter()
    for i in range(2000):
        example = make_example("LaMP_2", "a b", asker.profile, id=f"draw{i}", user=asker.user)
        counts.update(owner(item) for item in rank("LaMP_2", example, "Full_Random", pool=pool, size=10).items)
    assert "u3" not in counts and sum(counts.values()) == 20000
    assert 8 < counts["u1"] / counts["u0"] < 12.5
    assert 3.2 < counts["u2"] / counts["u0"] < 4.8
    per_item = Counter(item["id"] for item in pool.items if owner(item) != "u3")
    assert len(per_item) == 75


def test_full_random_draws_without_replacement_and_prefix_stable():
    pool = ItemPool(make_split([5, 50, 20]))
    for n in (1, 7, 30, 55):  # 55: every other item there is for u2
        drawn = pool.sample("u2", n, np.random.default_rng(3))
        assert len({item["id"] for item in drawn}) == len(drawn) == min(n, 55)
        assert drawn[:5] == pool.sample("u2", 5, np.random.default_rng(3))[:n]
    example = make_example("LaMP_2", "a", [lamp_2_item(str(i), "d", "t") for i in range(20)], user="u9")
    whole = rank("LaMP_2", example, "Full_Random", pool=pool).items
    assert len(whole) == 20  # the user's own profile size by default
    assert retrieve("LaMP_2", example, "Full_Random", 3, rank_offset=2, pool=pool) == whole[2:5]


def reference_layout(examples):
    """ItemPool's layout as it was first written, over item dicts: users sorted,
    each user's items deduplicated by id (the first seen kept) and sorted by id."""
    by_user = {}
    for example in examples:
        items = by_user.setdefault(example.user, {})
        for item in example.profile:
            items.setdefault(str(item["id"]), item)
    return [by_user[user][i] for user in sorted(by_user) for i in sorted(by_user[user])]


def test_the_pool_layout_sorts_as_python_does_and_keeps_first_occurrences():
    rng = random.Random(5)
    ids = ["9", "10", "1", "a", "B", "é", "e", "z", "ü-1", "\U0001f600", "日本", 7, 12]
    examples = []
    for i in range(40):  # users repeat, out of order; profiles repeat ids, within and across examples
        profile = [{"id": rng.choice(ids), "description": f"d{i}-{j}", "tag": "t"} for j in range(rng.randint(0, 9))]
        examples.append(make_example("LaMP_2", "a b", profile, id=f"q{i}", user=rng.choice(["u2", "u10", "u1", "é"])))
    pool = ItemPool(examples)
    assert [id(item) for item in pool.items] == [id(item) for item in reference_layout(examples)]
    for slot, item in enumerate(pool.items):
        assert examples[pool.row[slot]].profile[pool.pos[slot]] is item


def test_a_pool_laid_out_from_ids_alone_draws_what_the_examples_draw():
    examples = make_split([random.Random(i).randint(0, 20) for i in range(30)])
    for u in (0, 1, 2):  # time-based: a user's later example repeats items, plus a new one
        later = examples[u].profile[::-1] + [lamp_2_item(f"u{u}-new", "a b c", "x")]
        examples.append(make_example("LaMP_2", "b c d", later, id=f"q{u}-later", user=f"u{u}"))
    random.Random(1).shuffle(examples)
    in_memory = ItemPool(examples)
    fetched = []

    def items(rows, positions):
        fetched.append(len(rows))
        return [examples[r].profile[p] for r, p in zip(rows, positions)]

    ids = pa.array([str(item["id"]) for example in examples for item in example.profile])
    light = ItemPool.from_ids([e.user for e in examples], [len(e.profile) for e in examples], ids, items)
    assert light.span == in_memory.span and light.mean_profile_size == in_memory.mean_profile_size
    assert light.row.tolist() == in_memory.row.tolist() and light.pos.tolist() == in_memory.pos.tolist()
    assert not fetched  # laid out from the ids alone
    for example in examples:
        for retriever in ("Full_Random", "RanBM25"):
            for seed in (0, 3):
                a, b = (rank("LaMP_2", example, retriever, seed=seed, pool=pool) for pool in (in_memory, light))
                assert [id(item) for item in a.items] == [id(item) for item in b.items]
    assert fetched
    assert light.nbytes == 12 * len(light) == 12 * len(reference_layout(examples))


def test_other_user_retrievers_need_a_pool():
    with pytest.raises(LampError, match="ItemPool"):
        rank("LaMP_2", ranked_example(), "Full_Random")


# ----------------------------------------------------------------------------- Mixed


def test_mixed_pairs_input_halves_with_other_items_output_halves():
    profile = [lamp_2_item(str(i), "word " * i, f"tag{i}") for i in range(1, 13)]
    example = make_example("LaMP_2", "word", profile)
    inputs = retrieve("LaMP_2", example, "BM25", 4)
    outputs = retrieve("LaMP_2", example, "Random", 4, seed=5)
    mixed = retrieve("LaMP_2", example, "Mixed", 4, seed=5, input_retriever="BM25", output_retriever="Random")
    assert [m["id"] for m in mixed] == [i["id"] for i in inputs] == ["12", "11", "10", "9"]
    assert [m["description"] for m in mixed] == [i["description"] for i in inputs]
    assert [m["tag"] for m in mixed] == [o["tag"] for o in outputs]
    assert any(m["tag"] != f"tag{m['id']}" for m in mixed)  # the mapping really is broken
    assert profile[11]["tag"] == "tag12"  # and the profile itself is untouched


def test_mixed_with_full_random_outputs_and_an_offset():
    examples = make_split([10, 10, 10])
    pool = ItemPool(examples)
    example = examples[0]
    mixed = retrieve("LaMP_2", example, "Mixed", 3, rank_offset=1, pool=pool,
                     input_retriever="BM25", output_retriever="Full_Random")
    inputs = retrieve("LaMP_2", example, "BM25", 3, rank_offset=1)
    outputs = retrieve("LaMP_2", example, "Full_Random", 3, rank_offset=1, pool=pool)
    assert mixed == [{**i, "tag": o["tag"]} for i, o in zip(inputs, outputs)]


def test_mixed_with_one_random_retriever_on_both_sides_draws_each_side_apart():
    profile = [lamp_2_item(str(i), f"d{i}", f"tag{i}") for i in range(12)]
    example = make_example("LaMP_2", "q", profile)
    check_cell("LaMP_2", "Mixed", 4, input_retriever="Random", output_retriever="Random")
    ranking = retrieve("LaMP_2", example, "Random", 8, seed=2)
    mixed = retrieve("LaMP_2", example, "Mixed", 4, seed=2, input_retriever="Random", output_retriever="Random")
    # The input side is the draw of 4; the output halves are the permutation's next 4: never the item's own.
    assert [m["id"] for m in mixed] == [r["id"] for r in ranking[:4]]
    assert [m["tag"] for m in mixed] == [r["tag"] for r in ranking[4:]]
    assert all(m["tag"] != f"tag{m['id']}" for m in mixed)
    # BM25 on both sides is deterministic: each item keeps its own output half (the `both` cell).
    same = retrieve("LaMP_2", example, "Mixed", 4, input_retriever="BM25", output_retriever="BM25")
    assert same == retrieve("LaMP_2", example, "BM25", 4)


# ----------------------------------------------------------------------------- checking


def test_valid_cells_pass():
    check_cell("LaMP_2", "BM25", 4)
    check_cell("LaMP_5", "BM25", 0.3, "both", "middle", rank_offset=2)
    check_cell("LaMP_3", "none", 0, "only_output", "random")
    check_cell("LaMP_4", "Mixed", 2, input_retriever="BM25", output_retriever="Full_Random")
    check_cell("LaMP_7", "RanBM25", np.int64(3), "both", "end")


@pytest.mark.parametrize("args, kwargs, message", [
    (("LaMP_1", "Mixed", 2), {"input_retriever": "BM25", "output_retriever": "Random"}, "LaMP_1"),
    (("LaMP_7", "Mixed", 2), {"input_retriever": "BM25", "output_retriever": "Random"}, "LaMP_7"),
    (("LaMP_7", "BM25", 2, "only_output"), {}, "ablation must be 'both'"),
    (("LaMP_7", "BM25", 2, "decouple"), {}, "ablation must be 'both'"),
    (("LaMP_2", "BM25", -1), {}, "k must be >= 0"),
    (("LaMP_2", "BM25", 1.0), {}, "(0, 1)"),
    (("LaMP_2", "BM25", 1.5), {}, "(0, 1)"),
    (("LaMP_2", "BM25", 0.0), {}, "(0, 1)"),
    (("LaMP_2", "BM25", "4"), {}, "whole number"),
    (("LaMP_2", "BM25", True), {}, "whole number"),
    (("LaMP_2", "BM42", 2), {}, "valid: none, BM25, Random, Full_Random, RanBM25, Mixed"),
    (("LaMP_2", "BM25", 2, "half"), {}, "valid: both, only_output, decouple, only_input"),
    (("LaMP_2", "BM25", 2, "both", "sideways"), {}, "valid: start, end, middle, random"),
    (("LaMP_2", "Mixed", 2), {"input_retriever": "BM25"}, "output_retriever"),
    (("LaMP_2", "Mixed", 2), {"output_retriever": "BM25"}, "input_retriever"),
    (("LaMP_2", "Mixed", 2), {"input_retriever": "RanBM25", "output_retriever": "BM25"}, "BM25, Random, Full_Random"),
    (("LaMP_2", "BM25", 2), {"input_retriever": "Random"}, "Mixed only"),
    (("LaMP_2", "BM25", 2), {"rank_offset": -1}, "rank_offset"),
    (("LaMP_6", "BM25", 2), {}, "not public"),
])
def test_invalid_cells_are_refused_in_one_line(args, kwargs, message):
    with pytest.raises(LampError) as error:
        check_cell(*args, **kwargs)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- determinism


def all_draws(examples, pool, seed):
    out = {}
    for example in examples:
        for retriever in ("Random", "Full_Random", "RanBM25"):
            items = retrieve("LaMP_2", example, retriever, 5, seed=seed, pool=pool)
            out[example.id, retriever] = [item["id"] for item in items]
    return out


def test_draws_depend_only_on_seed_and_example_id():
    examples = make_split([random.Random(i).randint(3, 20) for i in range(30)])
    # Time-based: a user's later example repeats earlier items in another order, plus a new one.
    for u in (0, 1, 2):
        later = examples[u].profile[::-1] + [lamp_2_item(f"u{u}-new", "a b c", "x")]
        examples.append(make_example("LaMP_2", "b c d", later, id=f"q{u}-later", user=f"u{u}"))
    baseline = all_draws(examples, ItemPool(examples), seed=7)
    shuffled = examples[:]
    random.Random(4).shuffle(shuffled)
    # Another processing order, and a pool built from the examples in that order.
    assert all_draws(shuffled, ItemPool(shuffled), seed=7) == baseline
    # One example alone, after unrelated work on others.
    pool = ItemPool(shuffled)
    all_draws(shuffled[:10], pool, seed=3)
    assert all_draws([examples[17]], pool, seed=7) == {key: value for key, value in baseline.items()
                                                        if key[0] == examples[17].id}
    other_seed = all_draws(examples, pool, seed=8)
    for retriever in ("Random", "Full_Random", "RanBM25"):
        assert any(other_seed[e.id, retriever] != baseline[e.id, retriever] for e in examples)
