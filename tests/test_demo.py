"""The demo as a newcomer meets it: `python experiments.py` with no verb runs the
demo grid end to end and prints the results table; a second run reuses
everything; the MLflow UI on the printed store shows the parent run and its cells."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.cli import ROOT, run_cli

# The demo's own code path, on less data and one epoch, to keep the suite short.
SMALL = ["--users", "200", "--limit-train", "32", "--limit-dev", "24", "--epochs", "1"]


def table_of(stdout: str) -> str:
    start = stdout.index("LaMP_2: dev f1")
    return stdout[start:stdout.index("Every run, its metrics", start)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rest(port: int, endpoint: str, body: dict | None = None) -> dict:
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/{endpoint}"
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@pytest.mark.slow
def test_the_demo_runs_end_to_end_then_reuses_everything_and_shows_in_the_mlflow_ui(tmp_path):
    # Where DeepSpeed would compile its ops: a trial should compile none (half a minute each).
    extensions = tmp_path / "torch_extensions"
    first = run_cli("--workdir", tmp_path, *SMALL, env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)},
                    timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert not extensions.exists()
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
    uri = f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert f"mlflow ui --backend-store-uri {uri}" in first.stdout

    second = run_cli("--workdir", tmp_path, *SMALL, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "12 of 12 cell(s) already FINISHED" in second.stdout and "running 0" in second.stdout
    assert "prepare: 0 shard(s) computed" in second.stdout
    assert table_of(second.stdout) == table

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port)],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "mlflow ui did not start"
                time.sleep(1)
        experiment = rest(port, "experiments/get-by-name?experiment_name=demo")["experiment"]
        runs = rest(port, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
    finally:
        server.terminate()
        server.wait(timeout=60)
    tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs]
    (parent,) = [run for run, t in zip(runs, tags) if t.get("lamp_grid.role") == "grid"]
    children = [run for run, t in zip(runs, tags) if t.get("mlflow.parentRunId") == parent["info"]["run_id"]]
    assert parent["info"]["status"] == "FINISHED"
    assert len(children) == 12 and all(c["info"]["status"] == "FINISHED" for c in children)


def test_the_console_script_is_the_same_command(tmp_path):
    script = Path(sys.executable).parent / "lamp-grid"
    done = subprocess.run([str(script), "--dry-run", "--workdir", str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "grid demo: 12 cell(s), model tiny" in done.stdout
