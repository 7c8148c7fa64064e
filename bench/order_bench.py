"""Benchmark: what the demo's cells train per second, this checkout against another
commit's, each a whole demo run (every cell a fresh Ray Train run) into a store of
its own, one after the other, alternating, so that both see the same machine.

The number is each cell's `train_examples_per_s` (train examples over the seconds
spent in training steps, as the trial logs it); the result is the mean over the
cells and the ratio of this checkout's to the baseline's.

    python bench/order_bench.py --baseline fba33ba [--rounds 2] [--env NAME=VALUE ...]

--env is set for the baseline's runs only: e.g. the CPU kernel pins this checkout
sets itself (grid/environment.py), to tell their cost from the rest. Without
--baseline, this checkout is its own baseline (the ratio is then the noise).
--smoke runs one tiny cell instead of the demo, to see that the script works.
"""

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from report import write_result  # bench/report.py: scripts run from bench/

ROOT = Path(__file__).resolve().parents[1]
# --smoke: one cell of the tiny model on a few synthetic users, one epoch.
SMOKE_GRID = {"name": "order-bench-smoke", "tasks": ["LaMP_2"], "model": "tiny", "axes": [{"retriever": ["none"]}],
              "training": {"epochs": 1, "batch_size": 8, "beams": 1, "max_prompt_tokens": 64, "limit_dev": 8}}
SMOKE_USERS = 40


def grid_throughput(repo: Path, work: Path, env: dict, grid: list, experiment: str) -> dict:
    """cell key -> train examples/s of one run of `experiments.py *grid` in the checkout at `repo`."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{work / f'mlflow-{time.time_ns()}.db'}"
    done = subprocess.run([sys.executable, "experiments.py", *grid, "--workdir", str(work), "--tracking-uri", uri],
                          cwd=repo, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"the grid failed in {repo}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], "tags.cell_key != ''")
    return {r.data.tags["cell_key"]: r.data.metrics["train_examples_per_s"] for r in runs}


def what_runs(smoke: bool, scratch: Path) -> tuple:
    """(experiments.py's arguments, the MLflow experiment they log to): the demo, or --smoke's one cell."""
    if not smoke:
        return [], "demo"
    spec = scratch / "smoke.yaml"
    spec.write_text(yaml.safe_dump(SMOKE_GRID))
    return ["run", str(spec), "--data", "synthetic", "--users", str(SMOKE_USERS)], SMOKE_GRID["name"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", help="the commit to compare against (default: this checkout itself)")
    parser.add_argument("--rounds", type=int, default=1, help="demo runs of each, alternating")
    parser.add_argument("--env", nargs="*", default=[], metavar="NAME=VALUE", help="for the baseline's runs")
    parser.add_argument("--smoke", action="store_true", help="one tiny cell instead of the demo")
    parser.add_argument("--out", default="bench/results/order.json")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="lamp-order-bench-"))
    baseline = scratch / "baseline" if args.baseline else ROOT
    if args.baseline:
        subprocess.run(["git", "worktree", "add", "--detach", str(baseline), args.baseline], cwd=ROOT, check=True,
                       capture_output=True)
    try:
        grid, experiment = what_runs(args.smoke, scratch)
        extra = dict(pair.split("=", 1) for pair in args.env)
        # PYTHONPATH: each side's Ray workers import its own checkout's code.
        sides = {"baseline": (baseline, {**os.environ, **extra, "PYTHONPATH": str(baseline)}),
                 "this": (ROOT, {**os.environ, "PYTHONPATH": str(ROOT)})}
        seen = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, (repo, env) in sides.items():
                seen[name].append(grid_throughput(repo, scratch / f"work-{name}", env, grid, experiment))
        means = {name: sum(v for run in runs for v in run.values()) / sum(len(run) for run in runs)
                 for name, runs in seen.items()}
        write_result({"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, "
                      f"{os.cpu_count()} CPUs", "baseline": args.baseline or "this checkout", "baseline_env": extra,
                      "rounds": args.rounds, "train_examples_per_s": {k: round(v, 1) for k, v in means.items()},
                      "ratio_this_to_baseline": round(means["this"] / means["baseline"], 3),
                      "per_cell": {name: [{k: round(v, 1) for k, v in sorted(run.items())} for run in runs]
                                   for name, runs in seen.items()}}, args.out)
    finally:
        if args.baseline:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
