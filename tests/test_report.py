"""`report`: paired statistics that match an independent computation, and the
report of a real finished grid (the `vote` model on local Ray, a real MLflow
store): every cell, the figures, and a failed cell shown as missing."""

import itertools

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from scipy import stats

from grid.report import (
    RESAMPLES,
    Comparison,
    format_table,
    paired_statistics,
    seeds_interval,
    table_rows,
)
from grid.run import Workdir
from lamp.cell import Cell
from lamp.synth import write_synthetic
from tests.cli import call_cli

LABELS = ["comedy", "action", "romance"]


def examples(predict, n=120):
    return {f"{i}": (LABELS[i % 3], predict(i)) for i in range(n)}


def test_the_same_predictions_change_nothing():
    base = examples(lambda i: LABELS[i % 2])
    change, low, high, p = paired_statistics("LaMP_2", "f1", [(base, base)])
    assert change == low == high == 0 and p == 1


def test_a_clear_gain_is_significant_and_its_interval_holds_the_change():
    base = examples(lambda i: "comedy")
    better = examples(lambda i: LABELS[i % 3] if i % 4 else "comedy")
    change, low, high, p = paired_statistics("LaMP_2", "f1", [(better, base)])
    assert 0 < low < change < high and p < 0.001


def test_a_change_within_noise_is_not_significant():
    base = examples(lambda i: LABELS[i % 3] if i % 2 else "no such label")  # right on odd examples
    other = examples(lambda i: LABELS[i % 3] if i % 2 or i == 4 else "no such label")  # and one more
    change, low, high, p = paired_statistics("LaMP_2", "accuracy", [(other, base)])
    assert change == pytest.approx(1 / 120)
    assert low <= 0 <= high and p == 1


def test_interval_and_p_value_match_an_independent_computation():
    # Ten examples: accuracy's paired change is the mean of per-example differences.
    right_cell = [1, 1, 0, 1, 1, 0, 1, 1, 1, 0]
    right_base = [0, 1, 0, 0, 1, 1, 0, 0, 1, 0]
    cell = {f"{i}": ("comedy", "comedy" if r else "action") for i, r in enumerate(right_cell)}
    base = {f"{i}": ("comedy", "comedy" if r else "action") for i, r in enumerate(right_base)}
    change, low, high, p = paired_statistics("LaMP_2", "accuracy", [(cell, base)])
    differences = np.subtract(right_cell, right_base)
    assert change == pytest.approx(differences.mean())
    # The bootstrap of the mean difference, drawn with the same generator: the same interval.
    direct = stats.bootstrap((differences,), np.mean, n_resamples=RESAMPLES, method="percentile", batch=200,
                             rng=np.random.default_rng(0)).confidence_interval
    assert (low, high) == pytest.approx((direct.low, direct.high))
    # Every way of swapping the two cells' predictions example by example (2^10, exact).
    swapped = [np.mean(np.multiply(signs, differences)) for signs in itertools.product([1, -1], repeat=10)]
    assert p == pytest.approx(np.mean(np.abs(swapped) >= abs(differences.mean()) - 1e-12))


def test_several_seeds_average_their_changes():
    base = examples(lambda i: "comedy")
    seed0 = examples(lambda i: LABELS[i % 3])  # all right
    seed1 = examples(lambda i: LABELS[i % 3] if i % 2 else "comedy")
    change, *_ = paired_statistics("LaMP_2", "accuracy", [(seed0, base), (seed1, base)])
    one = [paired_statistics("LaMP_2", "accuracy", [(s, base)])[0] for s in (seed0, seed1)]
    assert change == pytest.approx(np.mean(one))


def test_the_interval_over_seeds_is_a_t_interval():
    values = [0.52, 0.55, 0.61]
    low, high = seeds_interval(values)
    half = stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / np.sqrt(3)
    assert (low, high) == pytest.approx((np.mean(values) - half, np.mean(values) + half))
    assert seeds_interval([0.5, 0.5]) == (0.5, 0.5)


def test_lower_is_better_metrics_read_a_drop_as_a_gain_in_the_header():
    def row(setting, retriever, value, **change):
        return Comparison(setting, Cell("LaMP_3", retriever, 4), "LaMP_3", "MAE", {0: value},
                          baseline=retriever == "none", **change)

    rows = [row("LaMP_3/lamp/none/tiny", "none", 0.9),
            row("LaMP_3/lamp/BM25/k=4/tiny", "BM25", 0.5, delta=-0.4, low=-0.5, high=-0.3, p_value=0.0005,
                items_shown=3.5, input_cut=0.25),
            row("LaMP_3/lamp/Random/k=4/tiny", "Random", 0.85, delta=-0.05, low=-0.2, high=0.1, p_value=0.5),
            # An interval that just misses 0 while the permutation test finds nothing.
            row("LaMP_3/lamp/Full_Random/k=4/tiny", "Full_Random", 0.89, delta=-0.01, low=-0.02, high=-0.0001,
                p_value=1.0),
            Comparison("LaMP_3/lamp/RanBM25/k=4/tiny", Cell("LaMP_3", "RanBM25", 4), "LaMP_3", "MAE", {},
                       missing={0: "FAILED"})]
    table = format_table(rows).splitlines()
    assert "MAE (lower is better)" in table[0]
    assert "(baseline)" in table[1]
    assert "-0.4000  [-0.5000, -0.3000]  p=0.0005" in table[2] and "not significant" not in table[2]
    assert "items   3.5  input cut  25%" in table[2]
    assert table_rows(rows[1:2], {})[1][8:10] == ["3.5", "25.0%"]
    assert table[3].endswith("not significant")
    assert table[4].endswith("p=1.0000  not significant")
    assert table[5].endswith("missing (seed 0 FAILED)")


# --- a real grid ---------------------------------------------------------------------

GRID = {"name": "report-grid", "tasks": ["LaMP_2"], "model": "vote", "seeds": [0, 1],
        "axes": [{"retriever": ["none"]},
                 {"retriever": ["Random", "BM25"], "k": [1, 4]},
                 {"retriever": ["BM25"], "order": ["start", "end"], "k": [0.1, 0.3]}]}
SETTINGS = ["LaMP_2/lamp/none/vote", "LaMP_2/lamp/Random/k=1/both/start/offset=0/vote",
            "LaMP_2/lamp/Random/k=4/both/start/offset=0/vote", "LaMP_2/lamp/BM25/k=1/both/start/offset=0/vote",
            "LaMP_2/lamp/BM25/k=4/both/start/offset=0/vote", "LaMP_2/lamp/BM25/k=0.1/both/start/offset=0/vote",
            "LaMP_2/lamp/BM25/k=0.3/both/start/offset=0/vote", "LaMP_2/lamp/BM25/k=0.1/both/end/offset=0/vote",
            "LaMP_2/lamp/BM25/k=0.3/both/end/offset=0/vote"]


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("report")
    write_synthetic(root / "data", ["LaMP_2"], users=60, seed=0)
    grid = root / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    done = call_cli("run", str(grid), "--data", str(root / "data"), "--workdir", str(root / "work"))
    assert done.returncode == 0, done.stderr[-3000:]
    return root, grid


def report_rows(markdown: str) -> dict:
    """setting -> the cells of its row in report.md's table."""
    rows = [line.strip("|").split(" | ") for line in markdown.splitlines() if line.startswith("| LaMP_2/")]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows}


@pytest.mark.slow
def test_the_report_of_a_finished_grid_has_every_cell_and_the_figures(finished_grid):
    root, grid = finished_grid
    out = root / "out"
    done = call_cli("report", str(grid), "--workdir", str(root / "work"), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = report_rows((out / "report.md").read_text())
    assert sorted(rows) == sorted(SETTINGS)
    for setting, cells in rows.items():
        assert cells[1] == "2"  # both seeds finished
        low, high = map(float, cells[4].strip("[]").split(", "))  # the CI over dev examples holds the mean
        assert low <= float(cells[2]) <= high
        if setting != "LaMP_2/lamp/none/vote":
            assert cells[6].startswith("[") and 0 <= float(cells[7]) <= 1  # paired CI and p-value
    assert rows["LaMP_2/lamp/BM25/k=4/both/start/offset=0/vote"][5].startswith("+")  # vote on BM25 beats `none`
    for name in ("LaMP_2-change.png", "LaMP_2-vs-k.png", "LaMP_2-vs-fraction.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
        assert f"]({name})" in (out / "report.md").read_text() and f'src="{name}"' in (out / "report.html").read_text()
    # The report is an artifact of the grid's parent run.
    client = MlflowClient(Workdir(root / "work").tracking_uri)
    experiment = client.get_experiment_by_name("report-grid").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`lamp_grid.role` = 'grid'")
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} >= {
        "report/report.md", "report/report.html", "report/LaMP_2-vs-k.png"}
    # --experiment finds the same cells from MLflow alone.
    by_name = call_cli("report", "--experiment", "report-grid", "--workdir", str(root / "work"),
                      "--out", str(root / "out2"))
    assert by_name.returncode == 0, by_name.stderr[-3000:]
    assert sorted(report_rows((root / "out2" / "report.md").read_text())) == sorted(SETTINGS)


@pytest.mark.slow
def test_a_report_says_when_its_cells_ran_in_different_environments(finished_grid, tmp_path):
    root, grid = finished_grid
    client = MlflowClient(Workdir(root / "work").tracking_uri)
    experiment = client.get_experiment_by_name("report-grid").experiment_id
    runs = client.search_runs([experiment], "tags.cell_key != ''")
    assert all(r.data.tags["env.cpu_kernels"] == "MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=avx2 "
               "ONEDNN_MAX_CPU_ISA=AVX2" for r in runs)  # what every Ray worker runs with
    out = tmp_path / "same"
    done = call_cli("report", str(grid), "--workdir", str(root / "work"), "--out", str(out))
    assert done.returncode == 0 and "different environments" not in done.stdout, done.stderr[-3000:]
    # Three cells as a resume on another install would leave them.
    version = runs[0].data.tags["env.transformers"]
    for run in runs[:3]:
        client.set_tag(run.info.run_id, "env.transformers", "4.0.0")
    try:
        done = call_cli("report", str(grid), "--workdir", str(root / "work"), "--out", str(tmp_path / "mixed"))
    finally:
        for run in runs[:3]:
            client.set_tag(run.info.run_id, "env.transformers", version)
    assert done.returncode == 0, done.stderr[-3000:]
    note = f"  transformers: {version} ({len(runs) - 3} cell(s)); 4.0.0 (3 cell(s))"
    assert "these cells finished in different environments" in done.stdout and note in done.stdout
    assert note in (tmp_path / "mixed" / "report.md").read_text()


@pytest.mark.slow
def test_a_failed_cell_is_reported_missing_not_zero(finished_grid):
    root, grid = finished_grid
    client = MlflowClient(Workdir(root / "work").tracking_uri)
    experiment = client.get_experiment_by_name("report-grid").experiment_id
    runs = {r.data.tags["cell_key"]: r for r in client.search_runs([experiment], "tags.cell_key != ''")}
    # What a trial that crashed past its retries leaves: its run FAILED (here with
    # the metrics it had, which must not count).
    failed = ["LaMP_2/lamp/BM25/k=4/both/start/offset=0/seed=1/vote",
              "LaMP_2/lamp/Random/k=1/both/start/offset=0/seed=0/vote",
              "LaMP_2/lamp/Random/k=1/both/start/offset=0/seed=1/vote"]
    for key in failed:
        client.set_terminated(runs[key].info.run_id, "FAILED")
    out = root / "failed"
    done = call_cli("report", str(grid), "--workdir", str(root / "work"), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = report_rows((out / "report.md").read_text())
    assert sorted(rows) == sorted(SETTINGS)
    bm25 = rows["LaMP_2/lamp/BM25/k=4/both/start/offset=0/vote"]
    assert bm25[1] == "1 (missing: seed 1 FAILED)"
    assert float(bm25[2]) == pytest.approx(runs[failed[0].replace("seed=1", "seed=0")].data.metrics["dev_f1"],
                                           abs=1e-4)
    assert rows["LaMP_2/lamp/Random/k=1/both/start/offset=0/vote"][2] == "missing (seed 0 FAILED, seed 1 FAILED)"
    assert "missing (seed 0 FAILED, seed 1 FAILED)" in done.stdout


def test_a_deleted_or_absent_experiment_is_refused_before_any_page_is_written(tmp_path):
    client = MlflowClient(Workdir(tmp_path).tracking_uri)
    client.delete_experiment(client.create_experiment("demo"))  # as the MLflow UI's delete does
    done = call_cli("report", "demo", "--workdir", tmp_path, "--out", tmp_path / "out")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "MLflow experiment 'demo' (id 1) is deleted" in done.stderr and "Traceback" not in done.stderr
    done = call_cli("report", "--experiment", "no-such-grid", "--workdir", tmp_path, "--out", tmp_path / "out")
    assert done.returncode == 2 and "no MLflow experiment 'no-such-grid'" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()
