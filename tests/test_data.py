"""lamp.data: finding LaMP files in every layout, streaming and validating them."""

import inspect
import json
from pathlib import Path

import pytest

from lamp.data import (
    Example,
    SplitFiles,
    SplitSummary,
    find_splits,
    read_examples,
    read_outputs,
    summarize_split,
)
from lamp.errors import LampError
from tests.cli import call_cli

# --- writing LaMP files from Python data --------------------------------------


def movie(item_id, tag="comedy", **extra):
    return {"id": item_id, "description": f"a movie {item_id}", "tag": tag, **extra}


def question(qid, profile=None, **extra):
    """A LaMP_2 question with a two-item profile unless one is given."""
    if profile is None:
        profile = [movie(f"{qid}1"), movie(f"{qid}2", tag="action")]
    return {"id": qid, "input": f"description: film {qid}", "profile": profile, **extra}


def write_questions(path: Path, questions, jsonl=False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if jsonl:
        path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    else:
        path.write_text(json.dumps(questions, indent=1))
    return path


def write_outputs(path: Path, golds: dict, task="LaMP_2") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"task": task, "golds": [{"id": i, "output": o}
                                                         for i, o in golds.items()]}))
    return path


def write_split(directory: Path, split="dev", questions=None, golds=None, task="LaMP_2",
                jsonl=False) -> SplitFiles:
    """A split in `directory` (…/LaMP_k/<split>/ or …/LaMP_k/); golds default to
    one per question. Returns the SplitFiles read_examples takes."""
    if questions is None:
        questions = [question("1"), question("2")]
    suffix = ".jsonl" if jsonl else ".json"
    q_path = write_questions(directory / f"{split}_questions{suffix}", questions, jsonl)
    o_path = None
    if split != "test":
        if golds is None:
            golds = {str(q["id"]): "comedy" for q in questions}
        o_path = write_outputs(directory / f"{split}_outputs.json", golds, task)
    return SplitFiles(task=task, split=split, setting="user", questions=q_path, outputs=o_path)


def error_of(call, *args) -> str:
    """The LampError message of call(*args), fully consuming a generator."""
    with pytest.raises(LampError) as caught:
        result = call(*args)
        if inspect.isgenerator(result):
            list(result)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- find_splits: layouts -----------------------------------------------------


def test_official_nested_layout(tmp_path):
    write_split(tmp_path / "LaMP_2" / "dev", "dev")
    [split] = find_splits(tmp_path)
    assert split == SplitFiles(task="LaMP_2", split="dev", setting="user",
                               questions=tmp_path / "LaMP_2/dev/dev_questions.json",
                               outputs=tmp_path / "LaMP_2/dev/dev_outputs.json")


def test_flat_layout(tmp_path):
    write_split(tmp_path / "LaMP_2", "train")
    [split] = find_splits(tmp_path)
    assert (split.task, split.split, split.setting) == ("LaMP_2", "train", "user")
    assert split.questions == tmp_path / "LaMP_2/train_questions.json"
    assert split.outputs == tmp_path / "LaMP_2/train_outputs.json"


def test_user_based_dir_is_user_setting(tmp_path):
    write_split(tmp_path / "user-based" / "LaMP_2" / "dev", "dev")
    [split] = find_splits(tmp_path)
    assert split.setting == "user"


@pytest.mark.parametrize("setting_dir", ["time", "time-based"])
@pytest.mark.parametrize("nested", [True, False])
def test_time_dirs_are_time_setting(tmp_path, setting_dir, nested):
    task_dir = tmp_path / setting_dir / "LaMP_2"
    write_split(task_dir / "dev" if nested else task_dir, "dev")
    [split] = find_splits(tmp_path)
    assert (split.task, split.setting, split.split) == ("LaMP_2", "time", "dev")


def test_data_dir_may_be_the_task_dir(tmp_path):
    write_split(tmp_path / "LaMP_2" / "dev", "dev")
    [split] = find_splits(tmp_path / "LaMP_2")
    assert split.task == "LaMP_2"


def test_jsonl_questions_file_is_found(tmp_path):
    write_split(tmp_path / "LaMP_2", "dev", jsonl=True)
    [split] = find_splits(tmp_path)
    assert split.questions.name == "dev_questions.jsonl"


def test_test_split_has_no_outputs(tmp_path):
    write_split(tmp_path / "LaMP_2" / "test", "test")
    [split] = find_splits(tmp_path)
    assert split.outputs is None
    assert [e.output for e in read_examples(split)] == [None, None]


def test_splits_sorted_by_task_setting_split(tmp_path):
    for setting_dir in ("time", "user-based"):
        for task in ("LaMP_7", "LaMP_2"):
            for split in ("test", "dev", "train"):
                write_split(tmp_path / setting_dir / task / split, split, task=task)
    got = [(s.task, s.setting, s.split) for s in find_splits(tmp_path)]
    assert got == [(task, setting, split) for task in ("LaMP_2", "LaMP_7")
                   for setting in ("user", "time") for split in ("train", "dev", "test")]


def test_tasks_filter(tmp_path):
    write_split(tmp_path / "LaMP_2", "dev")
    write_split(tmp_path / "LaMP_7", "dev", task="LaMP_7")
    assert [s.task for s in find_splits(tmp_path, ["LaMP_7"])] == ["LaMP_7"]


def test_tasks_filter_skips_unknown_task_dirs(tmp_path):
    write_split(tmp_path / "LaMP_2", "dev")
    write_split(tmp_path / "LaMP_9", "dev")
    assert [s.task for s in find_splits(tmp_path, ["LaMP_2"])] == ["LaMP_2"]


# --- find_splits: errors ------------------------------------------------------


def test_missing_directory(tmp_path):
    message = error_of(find_splits, tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in message and "no such directory" in message


def test_no_task_found(tmp_path):
    write_split(tmp_path / "lamp2", "dev")  # not named LaMP_k
    message = error_of(find_splits, tmp_path)
    assert str(tmp_path) in message and "no LaMP task found" in message


def test_requested_tasks_not_found(tmp_path):
    write_split(tmp_path / "LaMP_2", "dev")
    message = error_of(find_splits, tmp_path, ["LaMP_4"])
    assert "none of LaMP_4 found" in message


def test_unknown_task_dir_lists_valid_tasks(tmp_path):
    write_split(tmp_path / "LaMP_9" / "dev", "dev")
    message = error_of(find_splits, tmp_path)
    assert str(tmp_path / "LaMP_9" / "dev") in message
    assert "unknown task 'LaMP_9'" in message and "LaMP_1, LaMP_2" in message


def test_lamp_6_dir_is_not_public(tmp_path):
    write_split(tmp_path / "LaMP_6" / "dev", "dev")
    message = error_of(find_splits, tmp_path)
    assert "LaMP_6" in message and "not public" in message


def test_lamp_6_requested_is_not_public(tmp_path):
    write_split(tmp_path / "LaMP_2", "dev")
    assert "not public" in error_of(find_splits, tmp_path, ["LaMP_6"])


def test_train_without_outputs_names_questions_file(tmp_path):
    split = write_split(tmp_path / "LaMP_2" / "train", "train")
    split.outputs.unlink()
    message = error_of(find_splits, tmp_path)
    assert str(split.questions) in message and "train_outputs.json" in message


def test_same_split_in_two_places(tmp_path):
    write_split(tmp_path / "LaMP_2" / "dev", "dev")
    write_split(tmp_path / "LaMP_2", "dev")
    message = error_of(find_splits, tmp_path)
    assert "LaMP_2 user-based dev" in message and "keep one" in message


# --- read_examples: good input ------------------------------------------------


@pytest.mark.parametrize("jsonl", [False, True])
def test_golds_joined_by_id_not_position(tmp_path, jsonl):
    questions = [question("a"), question("b"), question("c")]
    golds = {"c": "action", "a": "comedy", "b": "classic"}  # a different order
    split = write_split(tmp_path, questions=questions, golds=golds, jsonl=jsonl)
    assert [(e.id, e.output) for e in read_examples(split)] == [
        ("a", "comedy"), ("b", "classic"), ("c", "action")]


def test_example_fields(tmp_path):
    split = write_split(tmp_path, questions=[question("7")], golds={"7": "comedy"})
    [example] = read_examples(split)
    assert example == Example(id="7", user="7", input="description: film 7",
                              profile=[movie("71"), movie("72", tag="action")], output="comedy")


def test_jsonl_with_blank_lines(tmp_path):
    split = write_split(tmp_path, questions=[question("1"), question("2")], jsonl=True)
    split.questions.write_text("\n" + split.questions.read_text().replace("\n", "\n\n"))
    assert [e.id for e in read_examples(split)] == ["1", "2"]


def test_user_from_user_id_and_int_ids_become_strings(tmp_path):
    questions = [question(10, profile=[movie(5, date="2010-01-01")], user_id=3),
                 question(11, user_id="3")]
    split = write_split(tmp_path, questions=questions)
    first, second = read_examples(split)
    assert (first.id, first.user, second.user) == ("10", "3", "3")
    assert first.profile == [movie("5", date="2010-01-01")]


def test_empty_profile_is_valid(tmp_path):
    split = write_split(tmp_path, questions=[question("1", profile=[])])
    [example] = read_examples(split)
    assert example.profile == []


def test_lamp_3_score_as_string_or_number(tmp_path):
    profile = [{"id": "1", "text": "great", "score": "5"},
               {"id": "2", "text": "fine", "score": 3},
               {"id": "3", "text": "meh", "score": 2.0}]
    split = write_split(tmp_path, task="LaMP_3", questions=[question("q", profile=profile)],
                        golds={"q": "4"})
    [example] = read_examples(split)
    assert [item["score"] for item in example.profile] == ["5", 3, 2.0]
    assert example.output == "4"


def test_numeric_outputs_become_strings(tmp_path):
    path = tmp_path / "dev_outputs.json"
    path.write_text(json.dumps({"task": "LaMP_3", "golds": [{"id": 1, "output": 4}]}))
    assert read_outputs(path, "LaMP_3") == {"1": "4"}


def test_summarize_split(tmp_path):
    questions = [question("1", profile=[], user_id="u"),
                 question("2", profile=[movie("a")], user_id="u"),
                 question("3", profile=[movie("b"), movie("c"), movie("d"), movie("e"),
                                        movie("f")], user_id="v")]
    summary = summarize_split(write_split(tmp_path, questions=questions))
    assert summary == SplitSummary(examples=3, users=2, mean_profile=2.0, max_profile=5)


def test_summarize_empty_split(tmp_path):
    split = write_split(tmp_path, "test", questions=[])
    assert summarize_split(split) == SplitSummary(examples=0, users=0, mean_profile=0.0,
                                                  max_profile=0)


def test_examples_stream_before_a_bad_tail(tmp_path):
    # A few thousand examples (several of ijson's 64 KiB reads) then garbage:
    # every good example must come out before the error, so the reader never
    # needs the whole file in memory.
    split = write_split(tmp_path, "test", questions=[question(str(i)) for i in range(3000)])
    text = split.questions.read_text()
    split.questions.write_text(text[:text.rindex("}")] + "}, oops]")
    examples = read_examples(split)
    assert inspect.isgenerator(examples)
    seen = []
    with pytest.raises(LampError, match="malformed JSON at byte offset"):
        for example in examples:
            seen.append(example.id)
    assert seen == [str(i) for i in range(3000)]


# --- read_examples and read_outputs: bad input --------------------------------


def test_malformed_json_array_gives_byte_position(tmp_path):
    split = write_split(tmp_path, "test")
    text = json.dumps([question("1"), question("2")])
    bad_at = text.index("}, {") + 1
    split.questions.write_text(text[:bad_at] + " @" + text[bad_at:])
    message = error_of(read_examples, split)
    assert str(split.questions) in message
    assert f"malformed JSON at byte offset {bad_at + 1}:" in message and "@" in message


def test_malformed_json_array_position_past_first_read(tmp_path):
    split = write_split(tmp_path, "test", questions=[question(str(i)) for i in range(2000)])
    text = split.questions.read_text()
    bad_at = text.index('"id": "1500"')
    split.questions.write_text(text[:bad_at] + "," + text[bad_at:])
    assert f"malformed JSON at byte offset {bad_at}:" in error_of(read_examples, split)


def test_malformed_json_array_position_with_non_ascii_text(tmp_path):
    # yajl quotes 30 bytes either side of the error; here that cuts a
    # two-byte character, and the position must still be exact.
    split = write_split(tmp_path, "test")
    text = json.dumps([question("1", profile=[movie("é" * 40)])], ensure_ascii=False)
    data = text.encode()
    bad_at = data.index(b'"tag"') - 1  # an odd number of bytes after the last "é"
    split.questions.write_bytes(data[:bad_at] + b"@" + data[bad_at:])
    assert f"malformed JSON at byte offset {bad_at}:" in error_of(read_examples, split)


def test_byte_order_mark_is_skipped(tmp_path):
    split = write_split(tmp_path, "test")
    split.questions.write_bytes(b"\xef\xbb\xbf" + split.questions.read_bytes())
    assert [e.id for e in read_examples(split)] == ["1", "2"]


def test_json_lines_not_utf8(tmp_path):
    split = write_split(tmp_path, "test", jsonl=True)
    split.questions.write_bytes(split.questions.read_bytes() + b'{"id": "\xff"}\n')
    message = error_of(read_examples, split)
    assert "line 3" in message and "not UTF-8" in message


def test_malformed_json_lines_gives_line_and_column(tmp_path):
    split = write_split(tmp_path, "test", questions=[question("1"), question("2")], jsonl=True)
    lines = split.questions.read_text().splitlines()
    lines[1] = lines[1].replace('"input":', '"input"', 1)
    split.questions.write_text("\n".join(lines) + "\n")
    message = error_of(read_examples, split)
    assert str(split.questions) in message
    assert "line 2 column" in message and "malformed JSON" in message


def test_truncated_json_array(tmp_path):
    split = write_split(tmp_path, "test")
    text = split.questions.read_text()
    split.questions.write_text(text[:len(text) // 2])
    message = error_of(read_examples, split)
    assert str(split.questions) in message
    assert f"ends after {len(text) // 2} bytes" in message and "truncated" in message


def test_empty_questions_file(tmp_path):
    split = write_split(tmp_path, "test")
    split.questions.write_text("  \n")
    assert "empty" in error_of(read_examples, split)


def test_outputs_task_mismatch(tmp_path):
    split = write_split(tmp_path)
    write_outputs(split.outputs, {"1": "comedy", "2": "comedy"}, task="LaMP_3")
    message = error_of(read_examples, split)
    assert str(split.outputs) in message and "'task'" in message
    assert "'LaMP_3'" in message and "expected 'LaMP_2'" in message


def test_outputs_malformed_json(tmp_path):
    path = tmp_path / "dev_outputs.json"
    path.write_text('{"task": "LaMP_2",\n "golds": [}')
    message = error_of(read_outputs, path)
    assert str(path) in message and "line 2 column" in message


def test_outputs_golds_not_a_list(tmp_path):
    path = tmp_path / "dev_outputs.json"
    path.write_text(json.dumps({"task": "LaMP_2", "golds": {"1": "comedy"}}))
    message = error_of(read_outputs, path, "LaMP_2")
    assert "'golds'" in message and "expected an array, got an object" in message


def test_outputs_entry_without_output(tmp_path):
    path = tmp_path / "dev_outputs.json"
    path.write_text(json.dumps({"task": "LaMP_2", "golds": [{"id": "9"}]}))
    message = error_of(read_outputs, path, "LaMP_2")
    assert "id '9'" in message and "'golds[0].output'" in message and "missing" in message


def test_duplicate_ids_in_outputs(tmp_path):
    path = tmp_path / "dev_outputs.json"
    path.write_text(json.dumps({"task": "LaMP_2", "golds": [
        {"id": "1", "output": "comedy"}, {"id": 1, "output": "action"}]}))
    message = error_of(read_outputs, path, "LaMP_2")
    assert str(path) in message and "id '1'" in message and "duplicate id" in message


def test_question_ids_missing_from_outputs_are_named(tmp_path):
    questions = [question(str(i)) for i in range(8)]
    split = write_split(tmp_path, questions=questions, golds={"0": "comedy"})
    message = error_of(read_examples, split)
    assert str(split.questions) in message
    assert "7 question id(s) have no gold" in message and "'1', '2', '3', '4', '5', ..." in message


def test_extra_ids_in_outputs_are_named(tmp_path):
    split = write_split(tmp_path, questions=[question("1")],
                        golds={"1": "comedy", "x": "action", "y": "drama"})
    message = error_of(read_examples, split)
    assert "2 extra id(s)" in message and "'x', 'y'" in message
    assert str(split.outputs) in message


def test_duplicate_question_ids(tmp_path):
    split = write_split(tmp_path, "test", questions=[question("1"), question(1)])
    message = error_of(read_examples, split)
    assert str(split.questions) in message
    assert "id '1'" in message and "field 'id'" in message and "duplicate id" in message
    assert "array item 1" in message


def test_profile_item_missing_field(tmp_path):
    profile = [movie("a"), {"id": "b", "description": "no tag"}]
    split = write_split(tmp_path, "test", questions=[question("q1", profile=profile)])
    message = error_of(read_examples, split)
    assert str(split.questions) in message
    assert "id 'q1'" in message and "field 'profile[1].tag'" in message and "missing" in message


def test_profile_item_field_wrong_type(tmp_path):
    profile = [movie("a", tag=3)]
    split = write_split(tmp_path, "test", questions=[question("q1", profile=profile)])
    message = error_of(read_examples, split)
    assert "id 'q1'" in message and "field 'profile[0].tag'" in message
    assert "expected a string, got a number" in message


def test_boolean_score_is_not_a_number(tmp_path):
    profile = [{"id": "1", "text": "great", "score": True}]
    split = write_split(tmp_path, "test", task="LaMP_3", questions=[question("q", profile=profile)])
    assert "got a boolean" in error_of(read_examples, split)


def test_profile_not_a_list(tmp_path):
    split = write_split(tmp_path, "test", questions=[question("q1", profile={"id": "a"})],
                        jsonl=True)
    message = error_of(read_examples, split)
    assert "id 'q1'" in message and "field 'profile'" in message and "line 1" in message
    assert "expected an array, got an object" in message


def test_question_without_input(tmp_path):
    bad = question("q1")
    del bad["input"]
    split = write_split(tmp_path, "test", questions=[bad])
    message = error_of(read_examples, split)
    assert "id 'q1'" in message and "field 'input'" in message and "missing" in message


def test_question_not_an_object(tmp_path):
    split = write_split(tmp_path, "test", questions=[question("1"), ["not", "an", "object"]])
    message = error_of(read_examples, split)
    assert "array item 1" in message and "got an array" in message


# --- the command line ---------------------------------------------------------


def validate(data_dir):
    return call_cli("validate", "--data", data_dir)


def test_cli_validate_good_directory(tmp_path):
    write_split(tmp_path / "LaMP_2" / "dev", "dev")
    write_split(tmp_path / "LaMP_2" / "test", "test")
    result = validate(tmp_path)
    assert result.returncode == 0, result.stderr
    assert ("LaMP_2 user-based dev: 2 examples, 2 users, profile size mean 2.0 max 2"
            in result.stdout)
    assert "LaMP_2 user-based test: 2 examples" in result.stdout


def test_cli_validate_missing_directory(tmp_path):
    result = validate(tmp_path / "nowhere")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    [line] = result.stderr.splitlines()
    assert "no such directory" in line


def test_cli_validate_bad_split(tmp_path):
    write_split(tmp_path / "LaMP_2" / "dev", "dev",
                questions=[question("q1", profile=[movie("a", tag=3)])])
    result = validate(tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    [line] = result.stdout.splitlines()
    assert line.startswith("LaMP_2 user-based dev: ERROR ") and "profile[0].tag" in line
