"""LaMP's official metrics (docs/design.md §2), per example and aggregated.

Per-example scores are kept because later analyses pair cells example by
example; the aggregates are exactly what LaMP's own evaluator reports.
"""

import math

import numpy as np
from rouge_score import rouge_scorer
from sklearn.metrics import f1_score

from lamp.errors import LampError
from lamp.tasks import get_task

_ROUGE = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def label_index(labels: tuple, text: str) -> int:
    """The label's position, or -1 for anything not exactly a label."""
    text = text.strip()
    return labels.index(text) if text in labels else -1


def parse_rating(prediction: str, gold: str) -> float:
    """LaMP_3's reading of a prediction: a float, else the worse of 1 and 5."""
    try:
        value = float(prediction)
        # float() accepts "nan" and "inf", which would poison the mean; LaMP's
        # evaluator would report NaN. We count them as unparseable instead.
        if math.isfinite(value):
            return value
    except ValueError:
        pass
    gold_value = float(gold)
    return 1.0 if abs(1 - gold_value) > abs(5 - gold_value) else 5.0


def score_examples(task: str, golds: list, preds: list) -> dict:
    """Per-example scores, one list per key, aligned with the inputs."""
    spec = get_task(task)
    if spec.kind == "classification":
        return {"correct": [float(label_index(spec.labels, p) == label_index(spec.labels, g))
                            for g, p in zip(golds, preds)]}
    if spec.kind == "regression":
        errors = [parse_rating(p, g) - float(g) for g, p in zip(golds, preds)]
        return {"absolute_error": [abs(e) for e in errors], "squared_error": [e * e for e in errors]}
    scores = [_ROUGE.score(g.strip(), p.strip()) for g, p in zip(golds, preds)]
    return {"rouge-1": [s["rouge1"].fmeasure for s in scores],
            "rouge-L": [s["rougeL"].fmeasure for s in scores]}


def aggregate(task: str, golds: list, preds: list) -> dict:
    """The task's metrics over aligned lists of gold and predicted outputs."""
    spec = get_task(task)
    if not golds:
        raise LampError(f"{task}: no examples to evaluate")
    per_example = score_examples(task, golds, preds)
    if spec.kind == "classification":
        gold_ids = [label_index(spec.labels, g) for g in golds]
        pred_ids = [label_index(spec.labels, p) for p in preds]
        # The label set is fixed to the task's labels: -1 counts as an error but
        # is not a class, and a label with no support scores 0.
        f1 = f1_score(gold_ids, pred_ids, labels=list(range(len(spec.labels))),
                      average="macro", zero_division=0)
        return {"accuracy": float(np.mean(per_example["correct"])), "f1": float(f1)}
    if spec.kind == "regression":
        return {"MAE": float(np.mean(per_example["absolute_error"])),
                "RMSE": float(math.sqrt(np.mean(per_example["squared_error"])))}
    return {key: float(np.mean(values)) for key, values in per_example.items()}


def evaluate(task: str, golds: dict, preds: dict, preds_name="predictions") -> dict:
    """Metrics for predictions joined to golds by id; every id must match."""
    missing = [i for i in golds if i not in preds]
    extra = [i for i in preds if i not in golds]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} gold ids have no prediction (e.g. {', '.join(missing[:5])})")
        if extra:
            parts.append(f"{len(extra)} predicted ids are not in the golds (e.g. {', '.join(extra[:5])})")
        raise LampError(f"{preds_name}: " + "; ".join(parts))
    ids = list(golds)
    return aggregate(task, [golds[i] for i in ids], [preds[i] for i in ids])


def resampled_metric(task: str, metric: str, golds: list, preds: list):
    """The metric as a function of draws of the examples: it takes `drawn` (rows
    of example positions, a position may repeat) and gives the metric of every
    row at once. A row of every position gives what `aggregate` gives; bootstrap
    resamples and paired permutations are rows. The examples are scored here,
    once, however many rows are asked for later."""
    spec = get_task(task)
    if spec.kind == "classification" and metric == "f1":
        gold = np.array([label_index(spec.labels, g) for g in golds])
        pred = np.array([label_index(spec.labels, p) for p in preds])

        def macro_f1(drawn):
            g, p = gold[drawn], pred[drawn]
            f1 = np.zeros(len(g))
            for label in range(len(spec.labels)):  # -1, no label, is never a class
                is_gold, is_pred = g == label, p == label
                true_pos = (is_gold & is_pred).sum(axis=1)
                total = is_gold.sum(axis=1) + is_pred.sum(axis=1)
                f1 += np.divide(2 * true_pos, total, out=np.zeros(len(g)), where=total > 0)
            return f1 / len(spec.labels)
        return macro_f1
    key = {"accuracy": "correct", "MAE": "absolute_error", "RMSE": "squared_error"}.get(metric, metric)
    scores = np.array(score_examples(task, golds, preds)[key])

    def mean(drawn):
        value = scores[drawn].mean(axis=1)
        return np.sqrt(value) if metric == "RMSE" else value
    return mean
