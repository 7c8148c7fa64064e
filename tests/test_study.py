"""The `study` recipe against prompts written out by hand from the study's code
(Bingo-W/Personalisation-in-LLM: data_process/lamp_prompt.py,
lamp_prompt_ablation.py, datasets.py; retrival_models/bm25.py,
random_selection.py), through `render --recipe study --json`.

The tokenizer is a word-level one (words and runs of punctuation are tokens,
T5's </s> closes every sequence), so every count below can be done by hand.
"""

import json
import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config

from experiments import main
from lamp.cell import Cell
from lamp.data import Example
from lamp.errors import LampError
from lamp.recipes.study import Replay, chat_answer, chat_input
from lamp.tasks import LAMP_2_TAGS, LAMP_PROFILE_SIZE, TASKS
from tests.cli import call_cli, run_cli

LAMP_2_INPUT = TASKS["LaMP_2"].input_template.format("alpha beta gamma delta comedy")
LAMP_3_INPUT = TASKS["LaMP_3"].input_template.format("good great fine")
LAMP_4_INPUT = TASKS["LaMP_4"].input_template.format("rain storm flood")
LAMP_5_INPUT = TASKS["LaMP_5"].input_template.format("neural nets learn")
LAMP_7_INPUT = TASKS["LaMP_7"].input_template.format("happy sunny day")
LAMP_1_INPUT = TASKS["LaMP_1"].input_template.format(title="neural search", ref1="neural ranking",
                                                     ref2="cooking pasta")
# Per task, one dev example: (input, gold, profile). LaMP_2's BM25 by hand, with
# idf log(1 + (N - df + 0.5)/(df + 0.5)) over N = 4 (`e` is the query itself and
# is popped) and documents of equal length: a = alpha .357 + beta .693 + gamma
# 1.204; d = comedy 1.204 (its tag); b = alpha + beta = 1.050; c = alpha .357.
# So full items rank a, d, b, c; descriptions alone (`decouple`) a, b, c, d.
DATA = {
    "LaMP_2": (LAMP_2_INPUT, "action", [
        {"id": "a", "description": "alpha beta gamma zeta", "tag": "action"},
        {"id": "b", "description": "alpha beta eta theta", "tag": "classic"},
        {"id": "c", "description": "alpha iota kappa lambda", "tag": "fantasy"},
        {"id": "d", "description": "mu nu xi omicron", "tag": "comedy"},
        {"id": "e", "description": "alpha beta gamma delta comedy", "tag": "romance"}]),
    "LaMP_3": (LAMP_3_INPUT, "5", [
        {"id": "r", "text": "awful bad poor", "score": "1"},
        {"id": "p", "text": "good great nice", "score": "5"},
        {"id": "q", "text": "good bad poor", "score": "2"}]),
    "LaMP_4": (LAMP_4_INPUT, "Storm", [
        {"id": "h2", "text": "sun heat dry", "title": "Hot day"},
        {"id": "h1", "text": "rain storm wind", "title": "Big storm"}]),
    "LaMP_5": (LAMP_5_INPUT, "Nets", [
        {"id": "a2", "abstract": "graph theory proofs", "title": "Graph bounds"},
        {"id": "a1", "abstract": "neural nets train", "title": "Deep learning"}]),
    "LaMP_1": (LAMP_1_INPUT, "[1]", [
        {"id": "t1", "title": "neural search", "abstract": "x y"},
        {"id": "t3", "title": "bread baking", "abstract": "flour water"},
        {"id": "t2", "title": "neural ranking models", "abstract": "ranking docs"}]),
    "LaMP_7": (LAMP_7_INPUT, "a sunny day", [
        {"id": "w2", "text": "rainy night"},
        {"id": "w1", "text": "sunny day today"}]),
}
# A second LaMP_2 example: 80 items that all score 0 (BM25 keeps their order).
LONG_PROFILE = [{"id": f"long{i}", "description": f"x{i} y z", "tag": "comedy"} for i in range(80)]

ITEM = {  # LaMP2Prompt's per-item string
    "a": 'the tag for the movie:"alpha beta gamma zeta" is "action"',
    "b": 'the tag for the movie:"alpha beta eta theta" is "classic"',
    "c": 'the tag for the movie:"alpha iota kappa lambda" is "fantasy"',
    "d": 'the tag for the movie:"mu nu xi omicron" is "comedy"',
}


def full(*ids):
    return ", and ".join(ITEM[i] for i in ids) + ". " + LAMP_2_INPUT


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    for task, (task_input, gold, profile) in DATA.items():
        questions = [{"id": f"{task}-1", "input": task_input, "profile": profile}]
        golds = [{"id": f"{task}-1", "output": gold}]
        if task == "LaMP_2":
            questions.append({"id": "LaMP_2-2", "input": TASKS["LaMP_2"].input_template.format("q1"),
                              "profile": LONG_PROFILE})
            golds.append({"id": "LaMP_2-2", "output": "comedy"})
        for split in ("train", "dev"):
            folder = root / task / split
            folder.mkdir(parents=True)
            (folder / f"{split}_questions.json").write_text(json.dumps(questions))
            (folder / f"{split}_outputs.json").write_text(json.dumps({"task": task, "golds": golds}))
    return root


@pytest.fixture(scope="module")
def model(tmp_path_factory, data):
    """A word-level tokenizer saved as a T5 model's folder: every word of the data, and </s>."""
    words = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    texts = [q for task in DATA.values() for q in (task[0], *(str(v) for item in task[2] for v in item.values()))]
    texts += [item["description"] for item in LONG_PROFILE] + list(LAMP_2_TAGS)
    for text in texts:
        for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text):
            words.setdefault(word, len(words))
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=512)
    folder = tmp_path_factory.mktemp("words")
    tokenizer.save_pretrained(folder)
    T5Config(vocab_size=len(words)).save_pretrained(folder)
    return folder


def render(capsys, data, model, task, *args, recipe="study"):
    """`render --json` in this process: one dict per dev example."""
    assert main(["render", "--data", str(data), "--task", task, "--model", str(model), "--recipe", recipe,
                 "--json", *map(str, args)]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("order, k, expected", [
    ("start", 4, full("a", "d", "b", "c")),
    ("end", 4, full("c", "b", "d", "a")),
    ("middle", 4, full("c", "d", "a", "b")),  # reorder_list_middle, n even: [-1], [-3], [0], [2]
    ("start", 1, full("a")),
    ("start", 0.5, full("a", "d")),  # int(0.5 x 4): counted after the query item is popped
])
def test_lamp_2_full_items(capsys, data, model, order, k, expected):
    [row, _] = render(capsys, data, model, "LaMP_2", "--retriever", "BM25", "--k", k, "--order", order)
    assert row["prompt"] == expected


def test_random_order_is_one_seeded_shuffle(capsys, data, model):
    ranked = ["a", "d", "b", "c"]
    for seed in (0, 3):
        random.seed(seed)  # aggregated_prompt: random.seed(random_seed); random.shuffle(profile)
        expected = list(ranked)
        random.shuffle(expected)
        [row, _] = render(capsys, data, model, "LaMP_2", "--retriever", "BM25", "--k", 4, "--order", "random",
                          "--seed", seed)
        assert row["prompt"] == full(*expected)
        assert row["retrieved"] == expected


@pytest.mark.parametrize("ablation, expected", [
    ("only_output", 'the tag for the previous movies are"action""comedy""classic""fantasy". ' + LAMP_2_INPUT),
    ("decouple", 'the tag for the previous movies are"action""classic""fantasy""comedy". ' + LAMP_2_INPUT),
    ("only_input", 'The previous movies are "alpha beta gamma zeta""mu nu xi omicron""alpha beta eta theta"'
                   '"alpha iota kappa lambda". ' + LAMP_2_INPUT),
])
def test_lamp_2_ablations(capsys, data, model, ablation, expected):
    [row, _] = render(capsys, data, model, "LaMP_2", "--retriever", "BM25", "--k", 4, "--ablation", ablation)
    assert row["prompt"] == expected


# LaMP_3: p (good great) .47 + .98, q (good) .47, r 0. LaMP_4, _5, _7: the item
# sharing words with the query first.
@pytest.mark.parametrize("task, ablation, expected", [
    ("LaMP_3", "both", '5 is the score for"good great nice", and 2 is the score for"good bad poor". ' + LAMP_3_INPUT),
    ("LaMP_3", "only_output", "5, 2 is the score for the previous review. " + LAMP_3_INPUT),
    ("LaMP_3", "decouple", "5, 2 is the score for the previous review. " + LAMP_3_INPUT),
    ("LaMP_3", "only_input", 'The previous reviews are "good great nice""good bad poor". ' + LAMP_3_INPUT),
    ("LaMP_4", "both", '"Big storm" is the title for"rain storm wind", and "Hot day" is the title for"sun heat dry". '
     + LAMP_4_INPUT),
    ("LaMP_4", "only_output", '"Big storm""Hot day" is the title for previous articles. ' + LAMP_4_INPUT),
    ("LaMP_4", "decouple", '"Big storm""Hot day" is the title for previous articles. ' + LAMP_4_INPUT),
    ("LaMP_4", "only_input", 'The previous articles are "rain storm wind""sun heat dry". ' + LAMP_4_INPUT),
    ("LaMP_5", "both", '"Deep learning" is the title for"neural nets train", and "Graph bounds" is the title '
     'for"graph theory proofs". Following the given patterns ' + LAMP_5_INPUT),
    ("LaMP_5", "only_output", '"Deep learning""Graph bounds" is the title for the previous papers. Following the '
     "given patterns " + LAMP_5_INPUT),
    ("LaMP_5", "decouple", '"Deep learning""Graph bounds" is the title for the previous papers. Following the '
     "given patterns " + LAMP_5_INPUT),
    ("LaMP_5", "only_input", 'The previous papers are "neural nets train""graph theory proofs". Following the given '
     "patterns " + LAMP_5_INPUT),
    ("LaMP_7", "both", '"sunny day today", and "rainy night" are written by a person. Following the given patterns '
     + LAMP_7_INPUT),
    # LaMP_1: the paper's own item (title "neural search") popped, the titles after
    # every `title "..."`, with a space.
    ("LaMP_1", "both", 'For an author who has written the paper with the title "neural search" "neural ranking '
     'models", and "bread baking", which reference is related? Just answer with [1] or [2] without explanation. '
     '[1]: "neural ranking" [2]: "cooking pasta"'),
])
def test_every_task_and_ablation(capsys, data, model, task, ablation, expected):
    [row] = render(capsys, data, model, task, "--retriever", "BM25", "--k", 2, "--ablation", ablation)
    assert row["prompt"] == expected


def test_k_80_items_are_cut_to_their_share_and_the_prompt_to_512_tokens(capsys, data, model):
    [_, row] = render(capsys, data, model, "LaMP_2", "--retriever", "BM25", "--k", 80)
    # Each item's share is (512 - 256) / 80 = 3.2 tokens. 'the tag for the movie:"x5 y z" is "comedy"' is 15
    # tokens with </s>, so 12 are cut from 'x5 y z </s>' and one more: its description is empty.
    item = 'the tag for the movie:"" is "comedy"'
    assert row["prompt"] == ", and ".join([item] * 80) + ". " + TASKS["LaMP_2"].input_template.format("q1")
    # The tokenizer cuts the model's input to 512 tokens: 511 and </s>.
    assert len(row["input_ids"]) == 512 and row["input_ids"][-1] == 1
    assert row["input_cut"]
    # An item and its separator are 11 tokens (the tag for the movie :"" is " comedy ", and): item n ends in
    # token 11n - 1, so 46 items reach the model whole, and none of the task input does.
    assert row["retrieved"] == [f"long{i}" for i in range(46)]


def test_lamp_recipe_at_k_80_fits_its_budget_whole_input_top_items(capsys, data, model):
    [_, row] = render(capsys, data, model, "LaMP_2", "--retriever", "BM25", "--k", 80, recipe="lamp")
    task_input = TASKS["LaMP_2"].input_template.format("q1")
    assert len(row["input_ids"]) <= 512 and row["input_ids"][-1] == 1
    assert row["prompt"].endswith(". " + task_input) and not row["input_cut"]
    shown = len(row["retrieved"])
    assert 0 < shown < 80 and row["retrieved"] == [f"long{i}" for i in range(shown)]
    # Every item shown keeps its output half whole; input halves lose their tails to the even split.
    assert row["prompt"].count('" is "comedy"') == shown


def test_the_model_receives_the_prompt_cut_by_its_tokenizer(data, model):
    done = call_cli("render", "--data", data, "--task", "LaMP_4", "--retriever", "BM25", "--k", 1,
                   "--recipe", "study", "--model", model, "--json")
    assert done.returncode == 0, done.stderr
    [row] = [json.loads(line) for line in done.stdout.splitlines()]
    assert set(row) == {"id", "retrieved", "prompt", "input_ids", "input_cut"}
    assert row["retrieved"] == ["h1"]
    # '"Big storm" is the title for"rain storm wind". Generate ...': words and runs of punctuation, then </s>
    assert len(row["input_ids"]) == len(pre_tokenizers.Whitespace().pre_tokenize_str(row["prompt"])) + 1


def test_lamp_1_leakage_guard_compares_titles(capsys, data, model):
    # The paper's own item (its title is the paper's) goes, in both recipes.
    for recipe in ("lamp", "study"):
        [row] = render(capsys, data, model, "LaMP_1", "--retriever", "BM25", "--k", 3, recipe=recipe)
        assert sorted(row["retrieved"]) == ["t2", "t3"]


# --- the study's random draws, replayed --------------------------------------------------


def examples(n, size=6):
    return [Example(id=f"e{i}", user=f"u{i}", input=LAMP_2_INPUT,
                    profile=[{"id": f"e{i}-{j}", "description": f"d{j}", "tag": "comedy"} for j in range(size)],
                    output="comedy") for i in range(n)]


def test_random_draws_one_stream_per_forked_part():
    split = examples(30)
    drawn = Replay(Cell("LaMP_2", "Random", 2, recipe="study", seed=7)).split(split)
    # 30 examples in 24 processes: the first 6 parts hold 2 examples, the rest 1.
    # Each process starts from random.seed(7) (build_random_fn), then random.sample per example.
    expected, start = [], 0
    for part in range(24):
        random.seed(7)
        for example in split[start:start + (2 if part < 6 else 1)]:
            expected.append([item["id"] for item in random.sample(example.profile, 2)])
        start += 2 if part < 6 else 1
    assert [[item["id"] for item in items] for items in drawn] == expected
    # k beyond the profile: the whole profile, in its order, and the user's own item may come back.
    [whole] = Replay(Cell("LaMP_2", "Random", 9, recipe="study")).split(split[:1])
    assert whole == split[0].profile


def test_full_random_reuses_the_same_users_at_each_batch_position():
    train, dev = examples(30), examples(24)
    drawn = Replay(Cell("LaMP_2", "Full_Random", 2, recipe="study"), train, dev).split(dev)
    # 24 examples in 24 parts: every example is first in its batch, reseeded: the same draw.
    assert all(items == drawn[0] for items in drawn) and len(drawn[0]) == 2


def test_ranbm25_ranks_a_fake_profile_of_the_fixed_size():
    train, dev = examples(30, size=2), examples(3, size=2)
    cell = Cell("LaMP_2", "RanBM25", 500, recipe="study")
    drawn = Replay(cell, train, dev).split(dev)
    # 159 users drawn, 159 of their items kept, then BM25 over them (k beyond: all of them).
    assert [len(items) for items in drawn] == [LAMP_PROFILE_SIZE["LaMP_2"]] * 3


@pytest.mark.parametrize("cell, message", [
    (Cell("LaMP_7", "BM25", 2, "only_output", recipe="study"), "ablation must be 'both'"),
    (Cell("LaMP_1", "BM25", 2, "only_input", recipe="study"), "no only_input prompts for LaMP_1"),
    (Cell("LaMP_2", "BM25", 2, "only_output", "end", recipe="study"), "ignore the order"),
    (Cell("LaMP_2", "Random", 2, rank_offset=1, recipe="study"), "rank offset for BM25 and RanBM25 only"),
    (Cell("LaMP_2", "Random", 0.5, recipe="study"), "whole number of items for Random"),
    (Cell("LaMP_2", "Mixed", 2, input_retriever="Full_Random", output_retriever="Random", recipe="study"),
     "argument missing"),
    (Cell("LaMP_2", "BM25", 2, recipe="ours"), "unknown recipe 'ours'; valid: lamp, study"),
    (Cell("LaMP_2", "BM25", 2, rank_offset=0.5), "rank_offset must be a whole number >= 0, got 0.5"),
])
def test_cells_a_recipe_cannot_take_are_refused(cell, message):
    with pytest.raises(LampError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cell.check()


def test_study_cells_the_study_ran_pass():
    for cell in (Cell("LaMP_2", "BM25", 0.5, rank_offset=0.25, recipe="study"),
                 Cell("LaMP_3", "Mixed", 4, input_retriever="Random", output_retriever="Random", recipe="study"),
                 Cell("LaMP_5", "RanBM25", 4, "decouple", rank_offset=2, recipe="study")):
        cell.check()


def test_refused_before_anything_runs_with_exit_2(data):
    done = call_cli("render", "--data", data, "--task", "LaMP_7", "--retriever", "BM25", "--k", 2,
                   "--ablation", "only_output", "--recipe", "study")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    done = call_cli("render", "--data", data, "--task", "LaMP_2", "--retriever", "BM25", "--k", 2,
                   "--recipe", "study")
    assert done.returncode == 2 and "name a model" in done.stderr and "Traceback" not in done.stderr
    done = run_cli("run", "demo", "--recipe", "paper", "--dry-run")
    assert done.returncode == 2 and "unknown recipe 'paper'; valid: lamp, study" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# --- Llama-2-7b-chat ---------------------------------------------------------------------


def test_chat_input_quotes_generation_inputs_decodes_the_cut_and_asks_for_the_answer():
    from grid.tiny import train_tokenizer

    tokenizer = train_tokenizer([LAMP_4_INPUT, LAMP_3_INPUT] * 5, vocab_size=300)  # byte-level: decodes exactly
    # LlamaDatasets.llama_prompt: a space, the anchor, the rest quoted (its leading space kept); the
    # decoded text keeps the tokenizer's special tokens (here T5's </s>), as the study's did.
    assert chat_input("LaMP_4", LAMP_4_INPUT, tokenizer) == (
        'Generate a headline for  the following article: " rain storm flood"</s>\nAnswer:')
    # LaMP_1-3 as they are, cut to max_input tokens (with </s>) by the tokenizer.
    cut = chat_input("LaMP_3", LAMP_3_INPUT, tokenizer, max_input=4)
    assert cut.endswith("</s>\nAnswer:") and LAMP_3_INPUT.startswith(cut.removesuffix("</s>\nAnswer:"))
    assert len(tokenizer(cut.removesuffix("</s>\nAnswer:"))["input_ids"]) == 4


def test_chat_answer_is_the_first_line_after_the_last_answer_unquoted():
    assert chat_answer(' "Big storm"\nmore text') == "Big storm"
    assert chat_answer("rambling Answer: 4\n") == "4"
    assert chat_answer("") == ""


def test_render_shows_what_a_decoder_only_model_reads_under_the_study_recipe(data, tmp_path):
    from transformers import GPT2Config

    from grid.tiny import train_tokenizer

    folder = tmp_path / "decoder"
    train_tokenizer([LAMP_4_INPUT, "Big storm rain storm wind Hot day sun heat dry"] * 5, 300).save_pretrained(folder)
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(folder)
    done = call_cli("render", "--data", data, "--task", "LaMP_4", "--retriever", "BM25", "--k", 1,
                   "--recipe", "study", "--model", folder, "--json")
    assert done.returncode == 0, done.stderr
    [row] = [json.loads(line) for line in done.stdout.splitlines()]
    # Built for 3000 tokens, the article quoted after its anchor, then `\nAnswer:` (Eval_Llama2.py).
    assert row["prompt"] == ('"Big storm" is the title for"rain storm wind". Generate a headline for  the following '
                             'article: " rain storm flood"</s>\nAnswer:')

