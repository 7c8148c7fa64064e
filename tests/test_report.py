"""The results table's paired bootstrap: intervals that hold 0 exactly when a change is not significant."""

import pytest

from grid.report import Comparison, format_table, paired_bootstrap

LABELS = ["comedy", "action", "romance"]


def examples(predict):
    return {f"{i}": (LABELS[i % 3], predict(i)) for i in range(120)}


def test_the_same_predictions_change_nothing():
    base = examples(lambda i: LABELS[i % 2])
    change, low, high = paired_bootstrap("LaMP_2", "f1", base, base)
    assert change == low == high == 0


def test_a_clear_gain_is_significant_and_its_interval_holds_the_change():
    base = examples(lambda i: "comedy")
    better = examples(lambda i: LABELS[i % 3] if i % 4 else "comedy")
    change, low, high = paired_bootstrap("LaMP_2", "f1", better, base)
    assert 0 < low < change < high
    assert Comparison("b", "LaMP_2", "f1", 0.7, delta=change, low=low, high=high).significant


def test_a_change_within_noise_is_not_significant():
    base = examples(lambda i: LABELS[i % 3] if i % 2 else "no such label")  # right on odd examples
    other = examples(lambda i: LABELS[i % 3] if i % 2 or i == 4 else "no such label")  # and one more
    change, low, high = paired_bootstrap("LaMP_2", "accuracy", other, base)
    assert change == pytest.approx(1 / 120)
    assert low <= 0 <= high


def test_lower_is_better_metrics_read_a_drop_as_a_gain_in_the_header():
    rows = [Comparison("LaMP_3/none/seed=0/tiny", "LaMP_3", "MAE", 0.9, baseline=True),
            Comparison("LaMP_3/BM25/k=4/both/start/offset=0/seed=0/tiny", "LaMP_3", "MAE", 0.5,
                       delta=-0.4, low=-0.5, high=-0.3),
            Comparison("LaMP_3/Random/k=4/both/start/offset=0/seed=0/tiny", "LaMP_3", "MAE", 0.85,
                       delta=-0.05, low=-0.2, high=0.1)]
    table = format_table(rows).splitlines()
    assert "MAE (lower is better)" in table[0]
    assert "(baseline)" in table[1]
    assert "-0.4000  [-0.5000, -0.3000]" in table[2] and "not significant" not in table[2]
    assert table[3].endswith("not significant")
