"""Synthetic LaMP data: official layout, determinism, user-disjoint splits."""

import json
from pathlib import Path

import pytest

from lamp.errors import LampError
from lamp.synth import write_synthetic
from lamp.tasks import LAMP_2_TAGS, TASKS
from tests.cli import run_cli


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
    done = run_cli("synth", "--out", str(tmp_path), "--users", "20", "--seed", "5")
    assert done.returncode == 0, done.stderr
    done = run_cli("validate", "--data", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    for task in TASKS:
        for split in ("train", "dev"):
            assert f"{task} user-based {split}:" in done.stdout
    expected = {"LaMP_1": {"accuracy": 1.0, "f1": 1.0}, "LaMP_3": {"MAE": 0.0, "RMSE": 0.0},
                "LaMP_5": {"rouge-L": 1.0, "rouge-1": 1.0}}
    for task, perfect in expected.items():
        golds = str(tmp_path / task / "dev" / "dev_outputs.json")
        done = run_cli("evaluate", "--task", task, "--golds", golds, "--preds", golds)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == perfect
