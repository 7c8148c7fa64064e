"""What a grid found: per task, each arm's main dev metric, its change against
the non-personalized cell, and whether that change is real.

An *arm* is a cell without its seed; a row of the report is an arm, its
metric the mean over its seeds. Two kinds of interval:
- over seeds: a t interval of the mean (two seeds or more);
- over dev examples: a percentile bootstrap. A change against `none` is paired:
  both cells are scored on the same draws of the examples (joined by id), per
  seed, and the change is averaged over the seeds both finished. Its p-value is
  a paired permutation test: the two cells' predictions of an example swapped.
Both resample whole examples and recompute the metric (macro-F1 included) on
every draw; the statistics are scipy's.

A cell that did not finish is listed with its status, never counted as a zero.
"""

import html
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from grid import tracking
from grid.spec import GridCell
from grid.storage import building, digest, put_in_place, write_atomically
from lamp.cell import Cell
from lamp.errors import LampError
from lamp.metrics import resampled_metric
from lamp.tasks import get_task

RESAMPLES = 2000
STATISTICS = ("A row is a setting (a cell without its seed); its value is the mean over its seeds. "
              "Intervals are 95%: over seeds a t interval, over dev examples a percentile bootstrap "
              f"({RESAMPLES} resamples). The change against `none` is paired (the same draws of the examples "
              "for both cells, per seed) and its p-value comes from a paired permutation test; a change "
              "whose interval holds 0, or whose p-value is 0.05 or more, is marked not significant. "
              "A cell that did not finish is missing, not 0.")
# A progress bar per downloaded artifact would bury the table.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@dataclass
class Comparison:
    arm: str
    cell: Cell  # the axes (its seed is the first seed's)
    task: str
    metric: str
    values: dict  # seed -> main dev metric, of the seeds that FINISHED
    missing: dict = field(default_factory=dict)  # seed -> status, of the seeds that did not
    baseline: bool = False  # the task's `none` arm, which the others are compared against
    seeds_low: float | None = None  # 95% t interval of the mean over seeds
    seeds_high: float | None = None
    examples_low: float | None = None  # 95% bootstrap interval over dev examples
    examples_high: float | None = None
    delta: float | None = None  # change against the baseline; None for it, or without one
    low: float | None = None  # its 95% paired bootstrap interval
    high: float | None = None
    p_value: float | None = None  # paired permutation test
    items_shown: float | None = None  # mean profile items the dev prompts showed (over seeds)
    input_cut: float | None = None  # share of dev examples whose task input lost its tail

    @property
    def value(self) -> float | None:
        return float(np.mean(list(self.values.values()))) if self.values else None

    @property
    def significant(self) -> bool:
        # Both tests must agree: on a metric that is near 0 everywhere (macro-F1 of a
        # model that learned little) a bootstrap interval can just miss 0 while the
        # permutation test finds nothing (p = 1).
        return (self.low is not None and (self.low > 0 or self.high < 0)
                and (self.p_value is None or self.p_value < 0.05))


# --- statistics ---------------------------------------------------------------------


def per_example(client, run_id: str) -> dict:
    """id -> (gold, prediction) from a cell run's per_example_scores.json artifact."""
    path = client.download_artifacts(run_id, "per_example_scores.json")
    with open(path) as f:
        return {row["id"]: (row["gold"], row["prediction"]) for row in json.load(f)}


def common_ids(runs: list) -> list:
    return sorted(set.intersection(*(set(examples) for examples in runs)))


def paired_statistics(task: str, metric: str, pairs: list, resamples: int = RESAMPLES, seed: int = 0) -> tuple:
    """(change, low, high, p): a cell against its baseline, given one (cell
    examples, baseline examples) pair per seed, each id -> (gold, prediction).

    change: the mean over seeds of the cell's metric minus the baseline's, on
    the examples all have; low, high: its 95% percentile bootstrap interval; p:
    the two-sided p-value of a paired permutation test."""
    from scipy.stats import bootstrap, permutation_test

    ids = common_ids([examples for pair in pairs for examples in pair])
    n = len(ids)
    # Per seed, one list of 2n predictions, the cell's then the baseline's: a row
    # of positions picks whose prediction of each example is scored.
    scorers = [resampled_metric(task, metric, [cell[i][0] for i in ids] * 2,
                                [cell[i][1] for i in ids] + [base[i][1] for i in ids]) for cell, base in pairs]

    def change(mine, theirs, axis=-1):
        mine, theirs = np.atleast_2d(mine), np.atleast_2d(theirs)
        return np.mean([score(mine) - score(theirs) for score in scorers], axis=0)

    positions = np.arange(n)
    interval = bootstrap((positions,), lambda drawn, axis=-1: change(drawn, drawn + n), n_resamples=resamples,
                         vectorized=True, method="percentile", batch=200,
                         rng=np.random.default_rng(seed)).confidence_interval
    test = permutation_test((positions, positions + n), change, permutation_type="samples", vectorized=True,
                            n_resamples=resamples, batch=200, rng=np.random.default_rng(seed))
    return float(change(positions, positions + n)[0]), float(interval.low), float(interval.high), float(test.pvalue)


def examples_interval(task: str, metric: str, runs: list, resamples: int = RESAMPLES, seed: int = 0) -> tuple:
    """95% percentile bootstrap interval over dev examples of the metric's mean over seeds."""
    from scipy.stats import bootstrap

    ids = common_ids(runs)
    scorers = [resampled_metric(task, metric, [run[i][0] for i in ids], [run[i][1] for i in ids]) for run in runs]

    def value(drawn, axis=-1):
        return np.mean([score(np.atleast_2d(drawn)) for score in scorers], axis=0)

    interval = bootstrap((np.arange(len(ids)),), value, n_resamples=resamples, vectorized=True,
                         method="percentile", batch=200, rng=np.random.default_rng(seed)).confidence_interval
    return float(interval.low), float(interval.high)


def seeds_interval(values: list) -> tuple:
    """95% t interval of the mean of per-seed values."""
    from scipy.stats import sem, t

    spread = sem(values)
    if spread == 0:
        return float(values[0]), float(values[0])
    low, high = t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=spread)
    return float(low), float(high)


def compare_cells(client, results: list) -> list:
    """A Comparison per arm (CellResults grouped over seeds); each against
    the `none` arm of its task, setting, model and recipe."""
    groups = {}
    for result in results:
        groups.setdefault(result.cell.arm, []).append(result)
    cache = {}

    def examples(result):
        if result.run_id not in cache:
            cache[result.run_id] = per_example(client, result.run_id)
        return cache[result.run_id]

    rows, finished = [], {}
    for arm, group in groups.items():
        cell = group[0].cell
        metric = get_task(cell.cell.task).main_metric
        finished[arm] = {r.cell.cell.seed: r for r in group if r.status == "FINISHED"}
        prompts = {name: [r.metrics[f"dev_{name}"] for r in finished[arm].values() if f"dev_{name}" in r.metrics]
                   for name in ("items_shown", "input_cut_share")}
        rows.append(Comparison(arm, cell.cell, cell.cell.task, metric,
                               values={s: r.metrics[f"dev_{metric}"] for s, r in finished[arm].items()},
                               missing={r.cell.cell.seed: r.status for r in group if r.status != "FINISHED"},
                               baseline=cell.cell.retriever == "none",
                               items_shown=float(np.mean(prompts["items_shown"])) if prompts["items_shown"] else None,
                               input_cut=(float(np.mean(prompts["input_cut_share"])) if prompts["input_cut_share"]
                                          else None)))
    # A cell is compared with the `none` cell of its task, setting (its files), model and recipe.
    model = {arm: (group[0].cell.model, group[0].cell.cell.recipe, group[0].cell.cell.setting)
             for arm, group in groups.items()}
    baselines = {(r.task, model[r.arm]): r for r in rows if r.baseline and r.values}
    for row in rows:
        runs = finished[row.arm]
        if not runs:
            continue
        if len(runs) > 1:
            row.seeds_low, row.seeds_high = seeds_interval(list(row.values.values()))
        row.examples_low, row.examples_high = examples_interval(row.task, row.metric,
                                                                [examples(r) for r in runs.values()])
        base = baselines.get((row.task, model[row.arm]))
        seeds = sorted(set(runs) & set(finished[base.arm])) if base is not None and base is not row else []
        if seeds:
            pairs = [(examples(runs[s]), examples(finished[base.arm][s])) for s in seeds]
            row.delta, row.low, row.high, row.p_value = paired_statistics(row.task, row.metric, pairs)
    return rows


# --- the table ----------------------------------------------------------------------


def header(task: str) -> str:
    spec = get_task(task)
    better = "higher" if spec.higher_is_better else "lower"
    return f"{task}: dev {spec.main_metric} ({better} is better)"


def missing_text(row: Comparison) -> str:
    return ", ".join(f"seed {s} {status}" for s, status in sorted(row.missing.items()))


def prompt_text(row: Comparison) -> str:
    """What the dev prompts showed: items on average, and the share whose input was cut."""
    if row.items_shown is None:
        return ""
    return f"items {row.items_shown:5.1f}  input cut {row.input_cut:4.0%}"


def format_table(rows: list) -> str:
    """The console table: per task, each arm's metric, change against `none`,
    its 95% paired bootstrap CI over dev examples and p-value."""
    lines = []
    for task in dict.fromkeys(r.task for r in rows):
        lines.append(f"{header(task)}; the dev prompts' mean items shown and share of inputs cut; change "
                     "against `none`, 95% paired bootstrap CI over dev examples, p (paired permutation test)")
        mine = [r for r in rows if r.task == task]
        width = max(len(r.arm) for r in mine)
        for r in mine:
            if not r.values:
                lines.append(f"  {r.arm:<{width}}  missing ({missing_text(r)})")
                continue
            if r.delta is None:
                change = "(baseline)" if r.baseline else "(no `none` cell to compare with)"
            else:
                verdict = "" if r.significant else "  not significant"
                change = f"{r.delta:+.4f}  [{r.low:+.4f}, {r.high:+.4f}]  p={r.p_value:.4f}{verdict}"
            seeds = f"  ({len(r.values)} seeds)" if len(r.values) > 1 else ""
            missing = f"  missing: {missing_text(r)}" if r.missing else ""
            lines.append(f"  {r.arm:<{width}}  {r.value:.4f}  {prompt_text(r)}  {change}{seeds}{missing}")
    return "\n".join(lines)


def environment_note(results: list) -> str:
    """Where a grid's finished cells ran under different code, packages or hardware (a
    resume on another cluster, a new lock), what differs and in how many cells; else ""."""
    from collections import Counter

    finished = [r.environment for r in results if r.status == "FINISHED"]
    lines = []
    for name in sorted({name for environment in finished for name in environment}):
        counts = Counter(environment.get(name, "unrecorded") for environment in finished)
        if len(counts) > 1:
            lines.append(f"  {name.removeprefix('env.')}: "
                         + "; ".join(f"{value} ({n} cell(s))" for value, n in counts.most_common()))
    if not lines:
        return ""
    return ("Note: these cells finished in different environments, so a difference between them may be the "
            "environment's:\n" + "\n".join(lines))


# --- report.md and report.html ------------------------------------------------------


def interval(low, high) -> str:
    return "" if low is None else f"[{low:.4f}, {high:.4f}]"


def table_rows(rows: list, published: dict) -> list:
    """The report's table of one task: a list of cells per row, the header first."""
    out = [["setting", "seeds", "mean", "95% CI over seeds", "95% CI over dev examples", "change vs none",
            "95% paired bootstrap CI", "p", "items shown", "inputs cut", "published"]]
    for r in rows:
        if not r.values:
            out.append([r.arm, "0", f"missing ({missing_text(r)})", "", "", "", "", "", "", "", ""])
            continue
        seeds = str(len(r.values)) + (f" (missing: {missing_text(r)})" if r.missing else "")
        change = "baseline" if r.baseline else ("" if r.delta is None else f"{r.delta:+.4f}"
                                                + ("" if r.significant else " (not significant)"))
        p = "" if r.p_value is None else f"{r.p_value:.4f}"
        out.append([r.arm, seeds, f"{r.value:.4f}", interval(r.seeds_low, r.seeds_high),
                    interval(r.examples_low, r.examples_high), change, interval(r.low, r.high), p,
                    "" if r.items_shown is None else f"{r.items_shown:.1f}",
                    "" if r.input_cut is None else f"{r.input_cut:.1%}", published.get(r.arm, "")])
    return out


def markdown_table(table: list) -> list:
    """A table (a list of rows, the header first) as Markdown lines."""
    return (["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
            + ["| " + " | ".join(row) + " |" for row in table[1:]])


def results_markdown(rows: list) -> str:
    """The results table `run` prints, per task, in Markdown: a grid run's description in MLflow."""
    md = [f"{sum(len(r.values) for r in rows)} cell run(s) finished. {STATISTICS}", ""]
    for task in dict.fromkeys(r.task for r in rows):
        md += [f"### {header(task)}", "", *markdown_table(table_rows([r for r in rows if r.task == task], {})), ""]
    return "\n".join(md)


def write_report(rows: list, out: Path, title: str, source: str, published: dict | None = None,
                 note: str = "") -> list:
    """report.md, report.html and the figures (PNG) in `out`; returns the files written.
    note: what the report should say first (environment_note)."""
    from grid.figures import draw_figures, published_values  # heavy: it imports matplotlib

    out.mkdir(parents=True, exist_ok=True)
    published = published or {}
    figures = draw_figures(rows, out, published)
    finished = sum(len(r.values) for r in rows)
    missing = sum(len(r.missing) for r in rows)
    intro = (f"{finished} cell run(s) finished, {missing} missing; read from {source} on "
             f"{time.strftime('%Y-%m-%d %H:%M')}. {STATISTICS}")
    md = [f"# {title}", "", intro, ""] + ([note, ""] if note else [])
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>"] + (
        [f"<pre>{html.escape(note)}</pre>"] if note else [])
    for task in dict.fromkeys(r.task for r in rows):
        mine = [r for r in rows if r.task == task]
        table = table_rows(mine, published_values(mine, published.get(task, {})))
        md += [f"## {header(task)}", "", *markdown_table(table), ""]
        body += [f"<h2>{html.escape(header(task))}</h2>", "<table border=1 cellspacing=0 cellpadding=4>",
                 "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in table[0]) + "</tr>"]
        body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table[1:]]
        body.append("</table>")
        for figure_task, name, caption in figures:
            if figure_task == task:
                md += [f"![{caption}]({name})", "", f"*{caption}*", ""]
                body += [f'<figure><img src="{name}" alt="{html.escape(caption)}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>"]
    page = ("<!doctype html><html><head><meta charset=utf-8><title>" + html.escape(title) + "</title></head><body>"
            + "\n".join(body) + "</body></html>\n")
    write_atomically(out / "report.md", "\n".join(md).encode())
    write_atomically(out / "report.html", page.encode())
    return [out / "report.md", out / "report.html"] + [out / name for _, name, _ in figures]


def read_results(client, experiment, cells: list | None = None) -> list:
    """A CellResult per cell of the MLflow experiment (its newest FINISHED run,
    else its newest). cells: the grid's cells, listed even where no run exists;
    None: every cell the experiment has runs of."""
    by_key = tracking.cell_runs(client, experiment.experiment_id)
    if not by_key:
        raise LampError(f"MLflow experiment {experiment.name!r} has no cell runs")
    if cells is None:
        cells = sorted((GridCell.from_params(runs[0].data.params, f"run {runs[0].info.run_id}")
                        for runs in by_key.values()), key=lambda c: (c.cell.task, c.cell.retriever != "none", c.key))
    elif not any(c.key in by_key for c in cells):
        models = sorted({runs[0].data.tags.get("model", "?") for runs in by_key.values()})
        raise LampError(f"MLflow experiment {experiment.name!r} has no run of this grid's cells with model "
                        f"{cells[0].model}; its runs used {', '.join(models)} (pass --model)")
    return tracking.summarize(by_key, cells)


# --- test predictions, for LaMP's leaderboard -------------------------------------------


def cell_folder(key: str) -> str:
    """A cell key as a folder name: its parts joined by `__`, anything else unsafe as `_`."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", key.replace("/", "__"))


def export_test(client, results: list, out: Path) -> dict:
    """Each FINISHED cell's test predictions (the artifact `run --predict-test` logged)
    copied into out/<cell folder>/LaMP_k-test-predictions.json, the folder written
    whole or not at all. Returns cell key -> (folder, file name). Refuses an `out` that
    holds anything, and results with no test predictions at all."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LampError(f"{out}: exists and is not an empty folder; export the test predictions into a new one")
    found = {}
    for result in results:
        if result.status == "FINISHED":
            name = client.get_run(result.run_id).data.tags.get(tracking.TEST_PREDICTIONS)
            if name:
                found[result.cell.key] = (result.run_id, name)
    if not found:
        raise LampError(f"none of the {len(results)} cell(s) has test predictions: run the grid with "
                        "--predict-test (on data with a test split)")
    written, folders = {}, set()
    with building(out) as tmp:
        for key, (run_id, name) in found.items():
            folder = cell_folder(key)
            if folder in folders:  # two keys alike but for their unsafe characters
                folder = f"{folder}-{digest(key)[:8]}"
            folders.add(folder)
            (tmp / folder).mkdir()
            client.download_artifacts(run_id, name, str(tmp / folder))
            written[key] = (folder, name)
        if not put_in_place(tmp, out):
            raise LampError(f"{out}: written by another process meanwhile; export again into a new folder")
    return written
