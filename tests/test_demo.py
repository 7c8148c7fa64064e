"""The demo as a newcomer meets it: `python experiments.py` with no verb runs the
demo grid end to end, showing progress and ending with the results table, which
is README.md's to the last character; a second run reuses everything; and the
MLflow UI, in a real browser (Debian's headless Chromium, driven by Playwright),
shows the grid's cells to compare."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.cli import ROOT, run_cli

pytestmark = pytest.mark.saturating  # the demo's trials, two at a time here: after the other tests

# The demo's MLflow records as the code wrote them before #27's restructuring (535c591).
RECORDS = Path(__file__).parent / "fixtures" / "demo-records-before-27.json"
# What a record holds of its moment, machine, place and code rather than of its
# cell: when and where it ran, the commit, the environment, the timings, the data
# fingerprint (a digest of the shard entries' paths, under the work directory) and
# the render digests (content addresses that hash the rendering code's own source).
VOLATILE_TAGS = ("git_commit", "lamp_grid.code_diff", "lamp_grid.heartbeat", "lamp_grid.host", "lamp_grid.pid",
                 "lamp_grid.process_started", "mlflow.parentRunId", "mlflow.user", "mlflow.source.", "env.",
                 "lamp_grid.render.", "data_fingerprint")

def table_of(text: str) -> str:
    """The results table in a demo's output, or in README.md's code block of it: its
    lines, from LaMP_2's header to the last task's last row."""
    lines = text[text.index("LaMP_2: dev f1"):].splitlines()
    ends = [n for n, line in enumerate(lines) if not line.startswith(("LaMP_", "  LaMP_"))]
    return "\n".join(lines[:ends[0] if ends else len(lines)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo run twice in one work directory, as a newcomer would: (workdir, first, second)."""
    workdir = tmp_path_factory.mktemp("demo")
    # Where DeepSpeed would compile its ops: a trial should compile none (half a minute each).
    extensions = workdir / "torch_extensions"
    first = run_cli("--workdir", workdir, env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)},
                    timeout=1800)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert not extensions.exists()
    second = run_cli("--workdir", workdir, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return workdir, first, second


@pytest.mark.slow
def test_the_demo_runs_end_to_end_then_reuses_everything(demo):
    workdir, first, second = demo
    # A local cluster has Ray's dashboard, whose State API Ray Train's placement-group
    # cleaners poll every second; without it each poll warns ("Failed to query Ray
    # Train Controller actor state"), and they are quiet with it.
    assert "Ray dashboard: http://" in first.stdout
    assert "(PlacementGroupCleaner pid=" not in first.stdout + first.stderr
    table = table_of(first.stdout)
    lines = table.splitlines()
    assert len([line for line in lines if line.startswith("  LaMP_")]) == 12
    assert "LaMP_4: dev rouge-L" in table
    assert sum("(baseline)" in line for line in lines) == 2  # `none`, once per task
    assert sum("[" in line for line in lines) == 10  # every other cell with its interval
    uri = f"sqlite:///{workdir.resolve() / 'mlflow.db'}"
    assert f"`mlflow ui --backend-store-uri {uri}`, then open http://127.0.0.1:5000/#/experiments/" in first.stdout

    assert "12 of 12 cell(s) already FINISHED" in second.stdout and "running 0" in second.stdout
    assert "prepare: 0 shard(s) computed" in second.stdout
    assert table_of(second.stdout) == table


@pytest.mark.slow
def test_the_demo_prints_readmes_table(demo):
    """README's numbers come from the code: a change that moves them fails here until
    README.md changes in the same commit (on any x86-64 CPU: grid/environment.py pins
    the CPU kernels)."""
    printed = table_of(demo[1].stdout)
    assert printed == table_of((ROOT / "README.md").read_text()), "README.md's table is not the demo's:\n" + printed


def demo_records(workdir: Path) -> dict:
    """The demo experiment's tags and each grid or cell run's params, tags, dev and
    training metrics, datasets and artifacts (by content digest), by run name, with
    the work directory's path written as <workdir> (and `--workdir <workdir>`
    dropped from the commands recorded)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("demo")

    def artifacts(run) -> dict:
        folder = Path(urllib.parse.urlparse(run.info.artifact_uri).path)  # a local store: file:// URIs
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    records = {"experiment": experiment.tags}
    for run in client.search_runs([experiment.experiment_id]):
        records[run.info.run_name] = {
            "status": run.info.status,
            "params": run.data.params,
            "tags": {k: v for k, v in run.data.tags.items() if not k.startswith(VOLATILE_TAGS)},
            "metrics": {k: v for k, v in run.data.metrics.items()
                        if k.endswith("cut_share")
                        or not (k.startswith("system/") or k.endswith(("_s", "_share")))},
            "datasets": sorted(d.dataset.name for d in run.inputs.dataset_inputs),  # digests: the render's
            "artifacts": artifacts(run)}
    text = json.dumps(records, sort_keys=True).replace(str(workdir.resolve()), "<workdir>")
    return json.loads(text.replace(" --workdir <workdir>", ""))


@pytest.mark.slow
def test_the_demos_mlflow_records_are_what_they_were(demo):
    """#27 restructured the code with behaviour unchanged: the demo writes the same records."""
    assert demo_records(demo[0]) == json.loads(RECORDS.read_text())


@pytest.mark.slow
def test_every_cell_run_records_the_moment_and_machine_it_ran_on(demo):
    """What the records above leave out as volatile, checked for what it must be."""
    from mlflow.tracking import MlflowClient

    from grid.environment import code_state

    client = MlflowClient(f"sqlite:///{demo[0].resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("demo").experiment_id
    cells = client.search_runs([experiment], "tags.`lamp_grid.role` = 'cell'")
    assert len(cells) == 12
    for tags in (run.data.tags for run in cells):
        assert {k: tags[k] for k in ("git_commit", "lamp_grid.code_diff")} == code_state()
        assert len(tags["lamp_grid.render.train"]) == len(tags["lamp_grid.render.dev"]) == 24
        # From the worker that trained it: versions, hardware, threads, CPU kernels, the lock.
        assert tags["env.torch"].startswith("2.13.0") and tags["env.transformers"] and tags["env.pyarrow"]
        assert tags["env.cpu"] and tags["env.gpu"] == "none" and tags["env.torch_threads"] == "1"
        assert tags["env.cpu_kernels"] == "MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2"
        assert tags["env.lock"] == "the lock's"


@pytest.mark.slow
def test_the_console_shows_progress_not_chatter(demo):
    _, first, _ = demo
    # Lines as a terminal shows them: a progress bar redrawn with \r is one line.
    printed = first.stdout.count("\n") + first.stderr.count("\n")
    assert printed <= 120, first.stdout + first.stderr
    for chatter in ("Reporting training result", "Checkpoint successfully created", "Loading weights",
                    "logging_progress", "(RayTrainWorker pid=", "DeprecationWarning"):
        assert chatter not in first.stdout + first.stderr, chatter
    # A line per cell as it starts and finishes, named by its key, with its main dev metric.
    finished = [line for line in first.stdout.splitlines() if "] finished " in line]
    assert len(finished) == 12
    assert all(": dev f1 " in line or ": dev rouge-L " in line for line in finished)
    assert any("LaMP_2/lamp/BM25/k=4/only_output/start/offset=0/seed=0/tiny: dev f1" in line for line in finished)
    # The results table and how to open the MLflow UI come last.
    last = first.stdout.rstrip().splitlines()
    assert last[-1].startswith("Compare the cells in the MLflow UI:"), last[-3:]
    assert "LaMP_4/lamp/BM25/k=4/only_output" in "\n".join(last[-6:])


def test_the_console_script_is_the_same_command(tmp_path):
    script = Path(sys.executable).parent / "lamp-grid"
    done = subprocess.run([str(script), "--dry-run", "--workdir", str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "grid demo: 12 cell(s), model tiny" in done.stdout


def chromium() -> str | None:
    """Debian's Chromium (README: `apt-get install chromium`), or none."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def mlflow_server(demo):
    """`mlflow server` on loopback over the demo's store: its address."""
    workdir = demo[0]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{workdir.resolve() / 'mlflow.db'}", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"],
                              cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job runners
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.fixture(scope="module")
def browser():
    if chromium() is None:
        pytest.skip("no Chromium on this machine: install Debian's (`apt-get install chromium`) to run the "
                    "MLflow UI browser test")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Flags: no sandbox as root; nothing that reaches out to Google's hosts (a closed network).
        launched = playwright.chromium.launch(executable_path=chromium(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        yield launched
        launched.close()


def screenshots(tmp_path) -> Path:
    """Where screenshots go: docs/mlflow/ when LAMP_GRID_SCREENSHOTS=1 (to refresh the committed ones)."""
    return ROOT / "docs" / "mlflow" if os.environ.get("LAMP_GRID_SCREENSHOTS") else tmp_path


@pytest.mark.slow
def test_the_mlflow_ui_shows_the_cells_in_a_real_browser(demo, mlflow_server, browser, tmp_path):
    from mlflow.tracking import MlflowClient

    from grid.tracking import cells_view

    workdir = demo[0]
    client = MlflowClient(f"sqlite:///{workdir.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("demo").experiment_id
    runs = client.search_runs([experiment])
    (parent,) = [r for r in runs if r.data.tags.get("lamp_grid.role") == "grid"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert len(children) == 12
    out = screenshots(tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1800, "height": 1100})

    # The grid's view, as `run` printed it: the parent and, expanded, every cell,
    # with the varying axes and each task's main dev metric as columns.
    page.goto(cells_view(mlflow_server, experiment))
    page.get_by_text(f"{parent.info.run_name}").first.wait_for(timeout=60_000)
    if page.get_by_role("button", name="Close").count():  # MLflow's assistant panel, open at first
        page.get_by_role("button", name="Close").first.click()
    page.locator("[role=row]", has_text=parent.info.run_name).locator("button").first.click()
    for name in children:
        page.get_by_text(name, exact=True).wait_for(timeout=30_000)
    headers = {h.inner_text().strip() for h in page.locator("[role=columnheader]").all()}
    assert {"Dataset", "dev_f1", "dev_rouge-L", "task", "retriever", "k", "ablation"} <= headers, headers
    # Each cell's row shows its task's main dev metric and the data it read.
    for name, run in children.items():
        index = page.locator(".ag-pinned-left-cols-container [role=row]", has_text=name).get_attribute("row-index")
        row = page.locator(f".ag-center-cols-container [role=row][row-index='{index}']").inner_text().split("\n")
        task = run.data.params["task"]
        metric = "dev_f1" if task == "LaMP_2" else "dev_rouge-L"
        assert repr(run.data.metrics[metric]).removesuffix(".0") in row, (name, row)  # as JavaScript prints it
        assert any(cell.startswith(f"{task}-dev (") for cell in row), (name, row)
    page.screenshot(path=str(out / "runs.png"))

    # Compare three LaMP_2 cells: MLflow's compare view opens on them.
    picked = ["LaMP_2/lamp/none/seed=0/tiny", "LaMP_2/lamp/BM25/k=4/both/start/offset=0/seed=0/tiny",
              "LaMP_2/lamp/BM25/k=4/only_output/start/offset=0/seed=0/tiny"]
    for name in picked:
        page.locator("[role=row]", has_text=name).first.locator("input[type=checkbox]").first.check()
    page.get_by_role("button", name="Compare").first.click()
    page.get_by_text("Comparing 3 Runs from 1 Experiment").wait_for(timeout=60_000)
    assert all(children[name].info.run_id in page.url for name in picked)
    page.get_by_text("Parallel Coordinates Plot").first.wait_for()
    page.screenshot(path=str(out / "compare.png"))

    # A cell's run: its description, params, dev metrics, data and system metrics.
    best = children[picked[-1]]
    page.goto(f"{mlflow_server}/#/experiments/{experiment}/runs/{best.info.run_id}?workflowType=machine_learning")
    page.get_by_text("Parameters (").first.wait_for(timeout=60_000)
    body = page.inner_text("body")
    for shown in (best.data.tags["mlflow.note.content"], "system/cpu_utilization_percentage",
                  "system/system_memory_usage_megabytes", "dev_f1", "dev_items_shown", "retriever", "only_output",
                  "LaMP_2-dev (", "Parent run"):
        assert shown in body, shown
    page.screenshot(path=str(out / "cell.png"))

    # The report's HTML: every figure loads.
    report = tmp_path / "report"
    done = run_cli("report", "demo", "--workdir", workdir, "--out", report, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    page.goto((report / "report.html").as_uri())
    page.wait_for_load_state("load")
    widths = page.eval_on_selector_all("img", "images => images.map(i => i.complete ? i.naturalWidth : 0)")
    assert widths and all(width > 0 for width in widths), widths
