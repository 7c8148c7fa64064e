"""The results table of a grid: each cell's main dev metric, its change against
the non-personalized cell of the same task, and a 95% confidence interval.

The interval is a paired bootstrap over dev examples: both cells are scored on
the same resamples of the examples (joined by id), and the change is read off
each resample. A change whose interval holds 0 is marked as not significant.
"""

import json
import os
from dataclasses import dataclass

import numpy as np

from lamp.metrics import resampled_metric
from lamp.tasks import get_task

RESAMPLES = 2000
# A progress bar per downloaded artifact would bury the table.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@dataclass
class Comparison:
    key: str
    task: str
    metric: str
    value: float
    baseline: bool = False  # the task's `none` cell, which the others are compared against
    delta: float | None = None  # None for the baseline, or a cell without one
    low: float | None = None
    high: float | None = None

    @property
    def significant(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)


def per_example(client, run_id: str) -> dict:
    """id -> (gold, prediction) from a cell run's per_example_scores.json artifact."""
    path = client.download_artifacts(run_id, "per_example_scores.json")
    with open(path) as f:
        return {row["id"]: (row["gold"], row["prediction"]) for row in json.load(f)}


def paired_bootstrap(task: str, metric: str, cell: dict, baseline: dict, resamples: int = RESAMPLES,
                     seed: int = 0) -> tuple:
    """(change, low, high): the metric of `cell` minus that of `baseline` on the
    examples both have, and its 95% percentile bootstrap interval (scipy)."""
    from scipy.stats import bootstrap

    ids = sorted(set(cell) & set(baseline))
    golds = [cell[i][0] for i in ids]
    mine = resampled_metric(task, metric, golds, [cell[i][1] for i in ids])
    theirs = resampled_metric(task, metric, golds, [baseline[i][1] for i in ids])

    def change(drawn, axis=-1):
        # `drawn`: resamples of example positions, one row each; as counts per
        # example, every resample is scored at once.
        rows = np.atleast_2d(drawn)
        counts = np.zeros((len(rows), len(ids)))
        np.add.at(counts, (np.arange(len(rows))[:, None], rows), 1)
        values = mine(counts) - theirs(counts)
        return values if np.ndim(drawn) > 1 else values[0]

    positions = np.arange(len(ids))
    interval = bootstrap((positions,), change, n_resamples=resamples, vectorized=True, method="percentile",
                         batch=200, rng=np.random.default_rng(seed)).confidence_interval
    return float(change(positions)), float(interval.low), float(interval.high)


def compare_cells(client, results: list) -> list:
    """A Comparison per FINISHED cell; each against the `none` cell of its task and seed."""
    finished = [r for r in results if r.status == "FINISHED"]
    baselines = {(r.cell.cell.task, r.cell.cell.seed): r for r in finished if r.cell.cell.retriever == "none"}
    cache = {}

    def examples(result):
        if result.run_id not in cache:
            cache[result.run_id] = per_example(client, result.run_id)
        return cache[result.run_id]

    rows = []
    for r in finished:
        task = r.cell.cell.task
        metric = get_task(task).main_metric
        base = baselines.get((task, r.cell.cell.seed))
        row = Comparison(r.cell.key, task, metric, r.metrics[f"dev_{metric}"], baseline=base is r)
        if base is not None and base is not r:
            row.delta, row.low, row.high = paired_bootstrap(task, metric, examples(r), examples(base))
        rows.append(row)
    return rows


def format_table(rows: list) -> str:
    """Per task, the cells with their metric, change against `none` and its 95% CI."""
    lines = []
    for task in dict.fromkeys(r.task for r in rows):
        spec = get_task(task)
        better = "higher" if spec.higher_is_better else "lower"
        lines.append(f"{task}: dev {spec.main_metric} ({better} is better); change against `none`, "
                     f"95% paired bootstrap CI over dev examples")
        mine = [r for r in rows if r.task == task]
        width = max(len(r.key) for r in mine)
        for r in mine:
            if r.delta is None:
                change = "(baseline)" if r.baseline else "(no `none` cell to compare with)"
            else:
                verdict = "" if r.significant else "  not significant"
                change = f"{r.delta:+.4f}  [{r.low:+.4f}, {r.high:+.4f}]{verdict}"
            lines.append(f"  {r.key:<{width}}  {r.value:.4f}  {change}")
    return "\n".join(lines)
