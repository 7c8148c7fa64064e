"""The official LaMP metric semantics, on cases computed by hand."""

import json
import math

import pytest

from lamp.errors import LampError
from lamp.metrics import aggregate, evaluate, score_examples
from tests.cli import call_cli


def test_classification_strips_and_fixes_the_label_set():
    # gold ids [2, 3, 2]; predictions: comedy (stripped, right), an invalid
    # label (-1, wrong but not a class), action (wrong).
    result = aggregate("LaMP_2", ["comedy", "action", "comedy"], [" comedy\n", "Comedy", "action"])
    assert result["accuracy"] == pytest.approx(1 / 3)
    # comedy: P=1, R=1/2 -> F1 2/3; action: P=0 -> 0; the 13 other tags have
    # no support and score 0; macro over all 15 tags.
    assert result["f1"] == pytest.approx((2 / 3) / 15)


def test_lamp_1_labels_and_empty_prediction():
    result = aggregate("LaMP_1", ["[1]", "[2]", "[2]", "[1]"], ["[1]", "[2]", "", "2"])
    assert result["accuracy"] == pytest.approx(0.5)
    # [1]: TP1 FN1 FP0 -> F1 2/3; [2]: TP1 FN1 FP0 -> 2/3
    assert result["f1"] == pytest.approx(2 / 3)


def test_rating_unparseable_takes_the_farther_end():
    # gold 1, "2" -> 1; gold 3, "x" -> 5 (1 and 5 tie, LaMP picks 5) -> 2;
    # gold 5, "nan" -> 1 -> 4; gold 4, " 4.5 " -> 0.5; gold 2, "" -> 5 -> 3
    golds, preds = ["1", "3", "5", "4", "2"], ["2", "x", "nan", " 4.5 ", ""]
    errors = [1, 2, 4, 0.5, 3]
    result = aggregate("LaMP_3", golds, preds)
    assert result["MAE"] == pytest.approx(sum(errors) / 5)
    assert result["RMSE"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / 5))


def test_rating_is_not_clipped():
    assert aggregate("LaMP_3", ["5"], ["7"])["MAE"] == pytest.approx(2.0)


def test_rouge_without_stemming_averaged_over_examples():
    # "running" vs "run" would match with a stemmer; here they do not.
    scores = score_examples("LaMP_4", ["the cat runs", "running fast", ""],
                            ["the cat runs", "run fast", "anything"])
    assert scores["rouge-1"] == pytest.approx([1.0, 0.5, 0.0])
    result = aggregate("LaMP_4", ["the cat runs", "running fast"], ["the cat runs", "run fast"])
    assert result["rouge-1"] == pytest.approx(0.75)
    # ROUGE-L: "a b c d" vs "a c b d": LCS 3 of 4 -> 0.75; ROUGE-1 is 1.
    result = aggregate("LaMP_5", ["a b c d"], ["a c b d"])
    assert result == {"rouge-L": pytest.approx(0.75), "rouge-1": pytest.approx(1.0)}


def test_gold_as_prediction_is_perfect_for_every_task():
    cases = {"LaMP_1": ["[1]", "[2]"], "LaMP_2": ["comedy", "true story"],
             "LaMP_3": ["1", "5"], "LaMP_7": ["so happy today!", "lol ok"]}
    assert aggregate("LaMP_1", cases["LaMP_1"], cases["LaMP_1"])["accuracy"] == 1.0
    assert aggregate("LaMP_2", cases["LaMP_2"], cases["LaMP_2"])["accuracy"] == 1.0
    assert aggregate("LaMP_3", cases["LaMP_3"], cases["LaMP_3"]) == {"MAE": 0.0, "RMSE": 0.0}
    assert aggregate("LaMP_7", cases["LaMP_7"], cases["LaMP_7"])["rouge-L"] == 1.0


def test_evaluate_joins_by_id_and_names_mismatches():
    golds = {"a": "comedy", "b": "action"}
    assert evaluate("LaMP_2", golds, {"b": "action", "a": "comedy"})["accuracy"] == 1.0
    with pytest.raises(LampError, match=r"preds.json: 1 gold ids have no prediction \(e.g. b\)"):
        evaluate("LaMP_2", golds, {"a": "comedy"}, preds_name="preds.json")
    with pytest.raises(LampError, match=r"not in the golds \(e.g. z\)"):
        evaluate("LaMP_2", golds, {"a": "comedy", "b": "x", "z": "x"})


def write_outputs(path, task, golds):
    path.write_text(json.dumps({"task": task, "golds": [{"id": i, "output": o} for i, o in golds.items()]}))
    return path



def test_evaluate_command_prints_lamp_keys(tmp_path):
    golds = write_outputs(tmp_path / "dev_outputs.json", "LaMP_3", {"1": "4", "2": "2"})
    preds = write_outputs(tmp_path / "preds.json", "LaMP_3", {"2": "3", "1": "4"})
    done = call_cli("evaluate", "--task", "LaMP_3", "--golds", str(golds), "--preds", str(preds))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"MAE": 0.5, "RMSE": pytest.approx(math.sqrt(0.5))}


def test_evaluate_command_refuses_a_task_mismatch(tmp_path):
    golds = write_outputs(tmp_path / "dev_outputs.json", "LaMP_3", {"1": "4"})
    preds = write_outputs(tmp_path / "preds.json", "LaMP_2", {"1": "4"})
    done = call_cli("evaluate", "--task", "LaMP_3", "--golds", str(golds), "--preds", str(preds))
    assert done.returncode == 2
    assert "preds.json" in done.stderr and "Traceback" not in done.stderr


def test_unknown_task_and_lamp_6_are_refused():
    done = call_cli("evaluate", "--task", "LaMP_6", "--golds", "x", "--preds", "y")
    assert done.returncode == 2 and "not public" in done.stderr
    done = call_cli("evaluate", "--task", "LaMP_9", "--golds", "x", "--preds", "y")
    assert done.returncode == 2 and "LaMP_1, LaMP_2, LaMP_3, LaMP_4, LaMP_5, LaMP_7" in done.stderr


@pytest.mark.parametrize("task", ["LaMP_1", "LaMP_2", "LaMP_3", "LaMP_4"])
def test_resampled_metric_is_the_metric_of_each_resample(task):
    import numpy as np

    from lamp.metrics import resampled_metric
    from lamp.tasks import get_task

    spec = get_task(task)
    n = 40
    if spec.labels:
        golds = [spec.labels[i % len(spec.labels)] for i in range(n)]
        preds = [spec.labels[(i // 2) % len(spec.labels)] if i % 3 else "no such label" for i in range(n)]
    elif spec.kind == "regression":
        golds = [str(1 + i % 5) for i in range(n)]
        preds = [str(1 + (i * 3) % 5) if i % 7 else "five" for i in range(n)]
    else:
        golds = [f"w{i % 4} w{i % 5} shared" for i in range(n)]
        preds = [f"w{i % 3} shared" for i in range(n)]
    rng = np.random.default_rng(1)
    drawn = np.vstack([np.arange(n), rng.integers(n, size=(5, n))])
    for metric, value in aggregate(task, golds, preds).items():
        fast = resampled_metric(task, metric, golds, preds)(drawn)
        assert fast[0] == pytest.approx(value)
        for value_of_row, row in zip(fast[1:], drawn[1:]):
            direct = aggregate(task, [golds[i] for i in row], [preds[i] for i in row])[metric]
            assert value_of_row == pytest.approx(direct)

