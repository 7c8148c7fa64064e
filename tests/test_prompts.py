"""Prompt rendering: orders, ablations, task formats and the token budget."""

from collections import deque

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lamp.prompts import TokenizerTokens, WhitespaceTokens, order_layout, render_prompt
from lamp.tasks import TASKS

WORDS = WhitespaceTokens()


def centre_out(n):
    """An independent statement of `middle`: each next rank goes to the other side."""
    layout = deque()
    for rank in range(n):
        layout.appendleft(rank) if rank % 2 else layout.append(rank)
    return list(layout)


@pytest.mark.parametrize("n", range(1, 11))
def test_middle_puts_the_best_in_the_centre(n):
    assert order_layout("middle", n, 0, "x") == centre_out(n)


def test_middle_examples_from_the_spec():
    assert order_layout("middle", 5, 0, "x") == [3, 1, 0, 2, 4]
    assert order_layout("middle", 6, 0, "x") == [5, 3, 1, 0, 2, 4]


@pytest.mark.parametrize("n", range(0, 8))
def test_end_is_start_reversed(n):
    assert order_layout("end", n, 0, "x") == order_layout("start", n, 0, "x")[::-1]


def test_random_order_depends_on_seed_and_id_only():
    layouts = {(seed, i): order_layout("random", 12, seed, i) for seed in (0, 1) for i in ("a", "b")}
    for layout in layouts.values():
        assert sorted(layout) == list(range(12))
    assert layouts[(0, "a")] == order_layout("random", 12, 0, "a")
    assert len({tuple(v) for v in layouts.values()}) == 4


def items_lamp_2(n, words=3):
    return [{"id": str(i), "description": " ".join(f"d{i}w{j}" for j in range(words)), "tag": f"tag{i}"}
            for i in range(n)]


def test_lamp_2_full_items_precede_the_input():
    prompt, ordered, cut = render_prompt(TASKS["LaMP_2"], "INPUT", items_lamp_2(2), "both", "start", 0, "q", WORDS)
    assert not cut
    assert prompt == ('the tag for the movie: "d0w0 d0w1 d0w2" is "tag0", and '
                      'the tag for the movie: "d1w0 d1w1 d1w2" is "tag1". INPUT')
    assert [item["id"] for item in ordered] == ["0", "1"]


def test_one_half_ablations_list_halves_after_a_lead():
    spec = TASKS["LaMP_2"]
    prompt = render_prompt(spec, "INPUT", items_lamp_2(2), "only_output", "end", 0, "q", WORDS).text
    assert prompt == 'the tag for the previous movies are "tag1" "tag0". INPUT'
    prompt = render_prompt(spec, "INPUT", items_lamp_2(2, 1), "only_input", "start", 0, "q", WORDS).text
    assert prompt == 'The previous movies are "d0w0" "d1w0". INPUT'


def test_task_joiners():
    item4 = [{"id": "1", "text": "body", "title": "head"}]
    assert render_prompt(TASKS["LaMP_4"], "IN", item4, "both", "start", 0, "q", WORDS)[0] == \
        '"head" is the title for "body". IN'
    item5 = [{"id": "1", "abstract": "abs", "title": "T"}]
    assert render_prompt(TASKS["LaMP_5"], "IN", item5, "both", "start", 0, "q", WORDS)[0] == \
        '"T" is the title for "abs". Following the given patterns IN'
    item3 = [{"id": "1", "text": "good", "score": 4}]
    assert render_prompt(TASKS["LaMP_3"], "IN", item3, "both", "start", 0, "q", WORDS)[0] == \
        '4 is the score for "good". IN'
    item7 = [{"id": "1", "text": "hi"}, {"id": "2", "text": "yo"}]
    assert render_prompt(TASKS["LaMP_7"], "IN", item7, "both", "start", 0, "q", WORDS)[0] == \
        '"hi", and "yo" are written by a person. Following the given patterns IN'


def test_lamp_1_inserts_titles_after_the_quoted_paper_title():
    spec = TASKS["LaMP_1"]
    task_input = spec.input_template.format(title="Deep Nets", ref1="R one", ref2="R two")
    items = [{"id": "1", "title": "Old Paper", "abstract": "a b c"}, {"id": "2", "title": "Other", "abstract": "d"}]
    prompt = render_prompt(spec, task_input, items, "both", "start", 0, "q", WORDS).text
    assert prompt.startswith('For an author who has written the paper with the title "Deep Nets", and '
                             '"Old Paper", and "Other", which reference is related?')
    assert prompt.endswith('[1]: "R one" [2]: "R two"')


def test_no_items_gives_the_bare_input():
    assert render_prompt(TASKS["LaMP_2"], "INPUT", [], "both", "start", 0, "q", WORDS) == ("INPUT", [], False)


def test_budget_trims_input_halves_never_outputs_or_the_task_input():
    spec = TASKS["LaMP_4"]
    items = [{"id": str(i), "text": " ".join(["body"] * 400), "title": f"title {i} words stay whole"}
             for i in range(8)]
    task_input = " ".join(f"w{j}" for j in range(100))
    prompt = render_prompt(spec, task_input, items, "both", "start", 0, "q", WORDS)
    assert prompt.text.endswith(". " + task_input)
    assert WORDS.count(prompt.text) <= 512
    for i in range(8):
        assert f'"title {i} words stay whole" is the title for "body' in prompt.text


def test_items_that_do_not_fit_are_dropped_least_relevant_first():
    spec = TASKS["LaMP_2"]
    items = items_lamp_2(200, words=5)
    task_input = " ".join(f"w{j}" for j in range(300))
    for order in ("start", "end", "middle", "random"):
        prompt = render_prompt(spec, task_input, items, "both", order, 0, "q", WORDS)
        shown = sorted(int(item["id"]) for item in prompt.items)
        assert 0 < len(shown) < 200 and shown == list(range(len(shown)))  # the top of the ranking
        assert WORDS.count(prompt.text) <= 512 and prompt.text.endswith(". " + task_input)
        assert prompt.text.count('" is "tag') == len(shown)


def test_only_a_task_input_over_the_budget_is_cut_and_then_alone():
    spec = TASKS["LaMP_4"]
    task_input = " ".join(f"w{j}" for j in range(700))
    items = [{"id": "1", "text": "x " * 50, "title": "kept"}]
    assert render_prompt(spec, task_input, items, "both", "start", 0, "q", WORDS) == (
        " ".join(f"w{j}" for j in range(512)), [], True)
    short = " ".join(f"w{j}" for j in range(500))
    prompt = render_prompt(spec, short, items, "both", "start", 0, "q", WORDS)
    assert not prompt.input_cut and prompt.text.endswith(short)


def word_tokenizer(max_length=512):
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(["body title kept input words " * 20], trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[UNK]", "[PAD]", "</s>"]))
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="</s>", model_max_length=max_length)


def test_budget_with_a_hugging_face_tokenizer_counts_everything():
    tokenizer = word_tokenizer()
    tokens = TokenizerTokens(tokenizer)
    spec = TASKS["LaMP_4"]
    items = [{"id": str(i), "text": "body " * 300, "title": "kept title"} for i in range(4)]
    task_input = "input words " * 60
    prompt = render_prompt(spec, task_input, items, "both", "start", 0, "q", tokens)
    assert prompt.text.endswith(task_input)
    assert prompt.text.count('"kept title"') == 4
    # Templates, separators and </s> included: exactly within the cap.
    assert len(tokenizer(prompt.text)["input_ids"]) <= 512


def test_the_budget_never_passes_the_models_longest_input():
    tokenizer = word_tokenizer(max_length=64)
    prompt = render_prompt(TASKS["LaMP_4"], "input words " * 10, [{"id": "1", "text": "body " * 300,
                                                                     "title": "kept"}],
                           "both", "start", 0, "q", TokenizerTokens(tokenizer), max_tokens=512)
    assert len(tokenizer(prompt.text)["input_ids"]) <= 64 and prompt.items
