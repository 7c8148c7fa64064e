"""Prompt rendering: orders, ablations, task formats and the token budget."""

from collections import deque

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from grid.tiny import train_tokenizer, training_texts
from lamp.data import find_splits, read_examples
from lamp.prompts import TokenCounter, WordCounter, order_layout, render_prompt, render_prompts
from lamp.retrieval import ABLATIONS, DENSE, ORDERS, RETRIEVERS, ItemPool, retrieve
from lamp.synth import write_synthetic
from lamp.tasks import TASKS

WORDS = WordCounter()


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
    counter = TokenCounter(tokenizer)
    spec = TASKS["LaMP_4"]
    items = [{"id": str(i), "text": "body " * 300, "title": "kept title"} for i in range(4)]
    task_input = "input words " * 60
    prompt = render_prompt(spec, task_input, items, "both", "start", 0, "q", counter)
    assert prompt.text.endswith(task_input)
    assert prompt.text.count('"kept title"') == 4
    # Templates, separators and </s> included: exactly within the cap.
    assert len(tokenizer(prompt.text)["input_ids"]) <= 512


def test_the_budget_never_passes_the_models_longest_input():
    tokenizer = word_tokenizer(max_length=64)
    prompt = render_prompt(TASKS["LaMP_4"], "input words " * 10, [{"id": "1", "text": "body " * 300,
                                                                     "title": "kept"}],
                           "both", "start", 0, "q", TokenCounter(tokenizer), max_tokens=512)
    assert len(tokenizer(prompt.text)["input_ids"]) <= 64 and prompt.items


# ----------------------------------------------------------------------------- batched rendering

SYNTH_TASKS = ("LaMP_2", "LaMP_4", "LaMP_7")  # short and long input halves, and none


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Per task, the train examples (32) of a small synthetic data set, and the
    tiny model's tokenizer (byte-level BPE) trained on it."""
    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, tasks=SYNTH_TASKS, users=40, seed=5)
    examples = {s.task: list(read_examples(s)) for s in find_splits(out, SYNTH_TASKS) if s.split == "train"}
    return examples, train_tokenizer(training_texts(out, SYNTH_TASKS))


def cases_of(task, examples, retrievers, ablation, k=6):
    """(example_id, task_input, items) of each example with what each retriever gives it."""
    pool = ItemPool(examples)
    mixed = {"input_retriever": "BM25", "output_retriever": "Random"}
    return [(e.id, e.input, retrieve(task, e, retriever, k, ablation=ablation, pool=pool,
                                     **(mixed if retriever == "Mixed" else {})))
            # Dense ones rank in prepare; Recency needs dates, which user-based synthetic items lack.
            for retriever in retrievers if retriever not in (*DENSE, "Recency") for e in examples]


class CountingTokenizer:
    """The real tokenizer, counting the calls that tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)


@pytest.mark.parametrize("tokenizer", ["words", "bpe"])
def test_prefetched_counts_and_trims_are_those_of_single_calls(synthetic, tokenizer):
    tokenizer = word_tokenizer() if tokenizer == "words" else synthetic[1]
    texts = ["", " ", '""', "body title kept", "input  words\n body", "café naïve 😀 words", '"quoted", and']
    single, batched = TokenCounter(tokenizer), TokenCounter(CountingTokenizer(tokenizer), remember=4)
    batched.prefetch(texts[-4:] * 2)
    assert batched.tokenizer.calls == 1 and list(batched.ends) == texts[-4:]
    for text in texts[::-1]:  # the prefetched ones first, while still remembered
        assert batched.count(text) == single.count(text)
        assert [batched.trim(text, n) for n in range(5)] == [single.trim(text, n) for n in range(5)]
    assert batched.tokenizer.calls == 4 and len(batched.ends) == 4  # one per text not prefetched; bounded


@pytest.mark.parametrize("task, ablation", [(task, ablation) for task in SYNTH_TASKS
                                            for ablation in (ABLATIONS if task != "LaMP_7" else ["both"])])
def test_batched_rendering_gives_the_prompts_of_one_by_one_rendering(synthetic, task, ablation):
    examples, tokenizer = synthetic
    spec = TASKS[task]
    cases = cases_of(task, examples[task][:8], RETRIEVERS, ablation)  # every retriever's items in one batch
    one_by_one = TokenCounter(tokenizer)  # never prefetches: one tokenizer call per text
    cut = dropped = shown = 0
    for max_tokens in (512, 96, 24):  # 24 cuts every task input; 96 some, and drops items
        batched = TokenCounter(tokenizer)
        for order in ORDERS:
            expected = [render_prompt(spec, task_input, items, ablation, order, 1, example_id, one_by_one, max_tokens)
                        for example_id, task_input, items in cases]
            assert render_prompts(spec, cases, ablation, order, 1, batched, max_tokens) == expected
            cut += sum(prompt.input_cut for prompt in expected)
            dropped += sum(len(prompt.items) < len(items) for prompt, (_, _, items) in zip(expected, cases))
            shown += sum(len(prompt.items) for prompt in expected)
    assert cut and dropped and shown


def test_batched_rendering_with_words_gives_the_prompts_of_one_by_one_rendering(synthetic):
    cases = cases_of("LaMP_2", synthetic[0]["LaMP_2"][:8], RETRIEVERS, "both")
    for max_tokens in (512, 64):
        assert render_prompts(TASKS["LaMP_2"], cases, "both", "random", 0, WORDS, max_tokens) == \
            [render_prompt(TASKS["LaMP_2"], task_input, items, "both", "random", 0, example_id, WORDS, max_tokens)
             for example_id, task_input, items in cases]


@pytest.mark.parametrize("ablation", ["both", "only_output", "only_input"])
def test_batched_rendering_calls_the_tokenizer_once_per_stage_not_per_text(synthetic, ablation):
    examples, tokenizer = synthetic
    spec, cases = TASKS["LaMP_4"], cases_of("LaMP_4", examples["LaMP_4"], ["BM25"], ablation)
    one_by_one, batched = CountingTokenizer(tokenizer), CountingTokenizer(tokenizer)
    expected = [render_prompt(spec, task_input, items, ablation, "middle", 0, example_id,
                              TokenCounter(one_by_one)) for example_id, task_input, items in cases]
    assert render_prompts(spec, cases, ablation, "middle", 0, TokenCounter(batched)) == expected
    assert len(cases) == 32 and one_by_one.calls > 32 and batched.calls <= 3
