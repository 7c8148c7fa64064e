"""Synthetic LaMP data: official layout, determinism, user-disjoint splits, LaMP-sized data."""

import json
from pathlib import Path

import pytest

from lamp.errors import LampError
from lamp.synth import (
    LAMP_INPUT_WORDS,
    LAMP_OUTPUT_WORDS,
    LAMP_QUESTIONS,
    MIN_SPLIT_USERS,
    content_words,
    like_lamp_counts,
    write_like_lamp,
    write_synthetic,
)
from lamp.tasks import LAMP_2_TAGS, LAMP_PROFILE_SIZE, TASKS
from tests.cli import call_cli


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic(out, tasks=list(TASKS), users=40, seed=7)
    return out


def load(out, task, split):
    folder = out / task / split
    questions = json.loads((folder / f"{split}_questions.json").read_text())
    outputs = json.loads((folder / f"{split}_outputs.json").read_text())
    return questions, outputs


@pytest.mark.parametrize("task", list(TASKS))
def test_official_layout_fields_and_templates(synthetic, task):
    spec = TASKS[task]
    questions, outputs = load(synthetic, task, "train")
    assert outputs["task"] == task
    assert [g["id"] for g in outputs["golds"]] == [q["id"] for q in questions]
    prefix = spec.input_template.split("{")[0]
    for question in questions:
        assert question["input"].startswith(prefix)
        assert question["profile"], "every synthetic user has a profile"
        for item in question["profile"]:
            assert set(item) == set(spec.item_fields)
    golds = [g["output"] for g in outputs["golds"]]
    if spec.labels:
        assert set(golds) <= set(spec.labels)
    if task == "LaMP_2":
        assert {item["tag"] for q in questions for item in q["profile"]} <= set(LAMP_2_TAGS)


@pytest.mark.parametrize("task", list(TASKS))
def test_train_and_dev_are_user_disjoint(synthetic, task):
    train, _ = load(synthetic, task, "train")
    dev, _ = load(synthetic, task, "dev")
    assert len(train) == 32 and len(dev) == 8
    assert not {q["id"] for q in train} & {q["id"] for q in dev}
    item_ids = [item["id"] for q in train + dev for item in q["profile"]]
    assert len(item_ids) == len(set(item_ids))


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_synthetic(tmp_path / name, tasks=["LaMP_3"], users=10, seed=seed)
    path = Path("LaMP_3/train/train_questions.json")
    assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()
    assert (tmp_path / "a" / path).read_bytes() != (tmp_path / "c" / path).read_bytes()


def test_a_user_does_not_depend_on_how_many_users_are_written(tmp_path):
    write_synthetic(tmp_path / "small", tasks=["LaMP_2"], users=5, seed=1)
    write_synthetic(tmp_path / "large", tasks=["LaMP_2"], users=50, seed=1)
    small, _ = load(tmp_path / "small", "LaMP_2", "train")
    large, _ = load(tmp_path / "large", "LaMP_2", "train")
    assert small == large[: len(small)]


def test_no_temporary_files_are_left(synthetic):
    assert not list(synthetic.rglob("*.tmp"))


def test_bad_arguments_are_refused():
    with pytest.raises(LampError, match="LaMP_6"):
        write_synthetic("unused", tasks=["LaMP_6"], users=10, seed=0)
    with pytest.raises(LampError, match="at least 5"):
        write_synthetic("unused", tasks=["LaMP_2"], users=2, seed=0)


def test_synth_validate_evaluate_round_trip(tmp_path):
    done = call_cli("synth", "--out", str(tmp_path), "--users", "20", "--seed", "5")
    assert done.returncode == 0, done.stderr
    done = call_cli("validate", "--data", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    for task in TASKS:
        for split in ("train", "dev"):
            assert f"{task} user-based {split}:" in done.stdout
    expected = {"LaMP_1": {"accuracy": 1.0, "f1": 1.0}, "LaMP_3": {"MAE": 0.0, "RMSE": 0.0},
                "LaMP_5": {"rouge-L": 1.0, "rouge-1": 1.0}}
    for task, perfect in expected.items():
        golds = str(tmp_path / task / "dev" / "dev_outputs.json")
        done = call_cli("evaluate", "--task", task, "--golds", golds, "--preds", golds)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == perfect


# ---- synth --like-lamp: LaMP's own sizes ----

def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def like_lamp(tmp_path_factory):
    """LaMP_7 at 2 % of LaMP's size, through the command line."""
    out = tmp_path_factory.mktemp("like_lamp")
    done = call_cli("synth", "--out", out, "--like-lamp", "--scale", "0.02", "--tasks", "LaMP_7", "--seed", "1")
    assert done.returncode == 0, done.stderr
    return out


def test_like_lamp_writes_the_scaled_question_counts_user_disjoint(like_lamp):
    train, train_golds = load(like_lamp, "LaMP_7", "train")
    dev, dev_golds = load(like_lamp, "LaMP_7", "dev")
    expected = [round(n * 0.02) for n in LAMP_QUESTIONS["LaMP_7"]]
    assert [len(train), len(dev)] == [len(train_golds["golds"]), len(dev_golds["golds"])] == expected
    assert max(int(q["id"]) for q in train) < min(int(q["id"]) for q in dev)  # one user, one question, one split


def test_like_lamp_profiles_and_inputs_have_lamps_mean_sizes(like_lamp):
    questions = [q for split in ("train", "dev") for q in load(like_lamp, "LaMP_7", split)[0]]
    sizes = [len(q["profile"]) for q in questions]
    assert mean(sizes) == pytest.approx(LAMP_PROFILE_SIZE["LaMP_7"], rel=0.2)
    assert max(sizes) > 2 * LAMP_PROFILE_SIZE["LaMP_7"]  # skewed like real profiles, not capped at 1.5 x
    assert mean(len(q["input"].split()) for q in questions) == pytest.approx(LAMP_INPUT_WORDS["LaMP_7"], rel=0.15)


def test_like_lamp_long_texts_and_titles_have_lamps_lengths(tmp_path):
    counts = write_like_lamp(tmp_path, ["LaMP_5"], scale=0.005, seed=2)
    assert counts == {"LaMP_5": (48, 12)}
    questions, outputs = load(tmp_path, "LaMP_5", "train")
    # Inputs are "Generate a title ...: <abstract>", so profile abstracts are as long as the inputs' content.
    abstracts = [len(item["abstract"].split()) for q in questions for item in q["profile"]]
    assert mean(abstracts) == pytest.approx(content_words("LaMP_5"), rel=0.1)
    assert mean(len(q["input"].split()) for q in questions) == pytest.approx(LAMP_INPUT_WORDS["LaMP_5"], rel=0.15)
    titles = [g["output"] for g in outputs["golds"]] + [item["title"] for q in questions for item in q["profile"]]
    assert mean(len(title.split()) for title in titles) == pytest.approx(LAMP_OUTPUT_WORDS["LaMP_5"], rel=0.15)
    assert mean(len(q["profile"]) for q in questions) == pytest.approx(LAMP_PROFILE_SIZE["LaMP_5"], rel=0.3)


def test_like_lamp_a_user_does_not_depend_on_the_scale(tmp_path, like_lamp):
    write_like_lamp(tmp_path, ["LaMP_7"], scale=0.01, seed=1)
    small, _ = load(tmp_path, "LaMP_7", "train")
    large, _ = load(like_lamp, "LaMP_7", "train")
    assert small == large[: len(small)]


def test_like_lamp_keeps_a_handful_of_users_per_split():
    assert like_lamp_counts("LaMP_2", 1e-6) == (MIN_SPLIT_USERS, MIN_SPLIT_USERS)
    assert like_lamp_counts("LaMP_2", 1.0) == LAMP_QUESTIONS["LaMP_2"]


@pytest.mark.parametrize("args, named", [
    (["--like-lamp", "--scale", "0"], "--scale"),
    (["--like-lamp", "--scale", "1.5"], "--scale"),
    (["--like-lamp", "--scale", "-0.1"], "--scale"),
    (["--like-lamp", "--users", "10"], "--users"),
    (["--like-lamp", "--profile-size", "5"], "--profile-size"),
    (["--scale", "0.5"], "--like-lamp"),
])
def test_like_lamp_bad_or_conflicting_options_are_refused(tmp_path, args, named):
    done = call_cli("synth", "--out", tmp_path / "out", "--tasks", "LaMP_7", *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert named in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "out").exists()


def test_write_like_lamp_refuses_a_bad_scale():
    for scale in (0, -1, 2, float("nan")):
        with pytest.raises(LampError, match="--scale"):
            write_like_lamp("unused", ["LaMP_7"], scale=scale)
