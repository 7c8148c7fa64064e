"""A real multi-node check, on this one machine: a grid that survives losing a node.

1. starts a Ray head (`ray start --head`, token authentication on) and a second
   Ray node (a separate `ray start`) that alone has the custom resource
   `trial_node`, which every trial's workers ask for: trials must run there;
2. starts `mlflow server` with a sqlite backend on loopback;
3. submits a small grid with `ray job submit --working-dir .`, tracked on that server;
4. kills the second node (its raylet and every process under it) in the middle
   of a trial, then starts it again;
5. checks that the job succeeds with every cell FINISHED exactly once in
   MLflow and nothing left RUNNING or SCHEDULED;
6. stops everything it started (and nothing else: other Ray clusters on the
   machine are left alone).

    python bench/cluster_check.py [--users 120] [--keep]

Exit status 0 when every check passes.
"""

import argparse
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
GRID = {"name": "cluster-check", "tasks": ["LaMP_2"], "model": "tiny",
        "axes": [{"retriever": ["none", "BM25", "Random"], "k": [2]}],
        "training": {"epochs": 3, "lr": 3e-3, "batch_size": 8, "beams": 1, "max_prompt_tokens": 96}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_ports() -> list:
    """A node's agent and metrics ports: Ray's fixed defaults would clash with the
    other node here, or with any other Ray on the machine."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(args, env, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def processes_under(work: Path) -> list:
    """Every process of the Ray nodes whose session directories are under `work`."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(work) in part for part in p.info["cmdline"] or ()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def raylets(work: Path) -> set:
    return {p.pid for p in processes_under(work) if "raylet" in Path((p.info["cmdline"] or [""])[0]).name}


def kill_tree(pid: int) -> int:
    """SIGKILL a process and everything under it, as a lost machine would; returns how many."""
    try:
        root = psutil.Process(pid)
        tree = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=10)
    return len(tree)


def wait_for(what: str, check, timeout: float, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=120, help="synthetic LaMP_2 users")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lamp-cluster-"))
    # Each node's own session directory (two nodes on one machine must not share
    # one: each would clean up the other's files); its processes are found by it.
    temp_dir = work / "ray"
    token = work / "auth_token"
    token.write_text(secrets.token_hex(32))
    # This process talks to the cluster too (the job's status): the same token.
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DS_ACCELERATOR": "cpu",
           "RAY_USAGE_STATS_ENABLED": "0"}
    gcs, dashboard, mlflow_port = free_port(), free_port(), free_port()
    # Ray's own helpers inside workers (Train's placement-group cleaner) find
    # their cluster by RAY_ADDRESS; with another Ray on the machine they would
    # otherwise refuse to guess, and a lost node's resources would never be freed.
    env["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"
    # Two logical CPUs a node: Ray Data's helper tasks need a whole free CPU next to a trial's workers.
    node_args = [BIN / "ray", "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=2",
                 '--resources={"trial_node": 1}', f"--temp-dir={work / 'ray-node'}", *own_ports()]
    mlflow = None
    ok = False
    try:
        log(f"work directory {work}")
        run([BIN / "ray", "start", "--head", f"--port={gcs}", "--num-cpus=2", f"--temp-dir={temp_dir}",
             "--include-dashboard=true", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
             *own_ports()], env)
        head = raylets(work)
        run(node_args, env)
        (node,) = raylets(work) - head
        log(f"Ray head on port {gcs} (dashboard {dashboard}); second node raylet pid {node} with trial_node=1")

        mlflow = subprocess.Popen([BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                                   "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
                                   "--artifacts-destination", str(work / "mlartifacts"), "--workers", "1"],
                                  env=env, stdout=open(work / "mlflow.log", "w"), stderr=subprocess.STDOUT)
        uri = f"http://127.0.0.1:{mlflow_port}"
        wait_for("mlflow server", lambda: _answers(f"{uri}/health"), 120)
        log(f"mlflow server at {uri}")

        run([BIN / "python", ROOT / "experiments.py", "synth", "--out", work / "data", "--tasks", "LaMP_2",
             "--users", args.users], env)
        grid = work / "grid.yaml"
        grid.write_text(yaml.safe_dump(GRID))
        address = f"http://127.0.0.1:{dashboard}"
        submit = [BIN / "ray", "job", "submit", f"--address={address}", "--working-dir", ROOT, "--no-wait",
                  "--submission-id", "lamp-cluster-check", "--",
                  "python", "experiments.py", "run", grid, "--data", work / "data", "--workdir",
                  work / "lamp-grid-work", "--tracking-uri", uri, "--resources-per-worker", '{"trial_node": 1}',
                  "--max-concurrent", "1"]
        tries = []

        def submitted() -> bool:
            tries.append(subprocess.run([str(a) for a in submit], env=env, capture_output=True, text=True))
            return tries[-1].returncode == 0

        # The head's job agent takes a while to come up after `ray start` returns.
        try:
            wait_for("the job agent", submitted, 300, every=3)
        except TimeoutError:
            raise RuntimeError(f"ray job submit failed {len(tries)} times; last:\n{tries[-1].stderr[-2000:]}") from None
        log("grid submitted: ray job submit --working-dir . -- python experiments.py run ...")

        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)

        def cell_runs():
            experiment = client.get_experiment_by_name("cluster-check")
            if experiment is None:
                return []
            return [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("cell_key")]

        def training_cell():
            running = [r for r in cell_runs() if r.info.status == "RUNNING"]
            return running and client.get_metric_history(running[0].info.run_id, "train_loss") and running[0]

        victim = wait_for("a trial in training", training_cell, 600, every=0.5)
        killed = kill_tree(node)
        log(f"killed the second node in the middle of {victim.data.tags['cell_key']} ({killed} processes)")
        time.sleep(15)
        run(node_args, env)
        log("started the second node again")

        status = wait_for("the job to end", lambda: _job_status(address), 900, every=5)
        logs = run([BIN / "ray", "job", "logs", f"--address={address}", "lamp-cluster-check"], env).stdout
        (work / "job.log").write_text(logs)
        log(f"job ended {status}; its log ends:\n" + "\n".join(logs.strip().splitlines()[-16:]))

        runs = cell_runs()
        keys = [r.data.tags["cell_key"] for r in runs]
        statuses = {r.data.tags["cell_key"]: r.info.status for r in runs}
        parents = [r for r in client.search_runs([client.get_experiment_by_name("cluster-check").experiment_id])
                   if r.data.tags.get("lamp_grid.role") == "grid"]
        checks = {
            "the job SUCCEEDED": status == "SUCCEEDED",
            "3 cells, one run each": len(keys) == 3 == len(set(keys)),
            "every cell FINISHED": all(s == "FINISHED" for s in statuses.values()),
            "nothing RUNNING or SCHEDULED": not any(r.info.status in ("RUNNING", "SCHEDULED") for r in runs + parents),
            "the parent run FINISHED": len(parents) == 1 and parents[0].info.status == "FINISHED",
            # Tune's own record of the loss: the trial errored, then its retry finished the cell.
            "the trial on the killed node errored and was retried": bool(re.search(r"Trial \S+ errored after", logs)),
        }
        for key, value in statuses.items():
            log(f"  {key}: {value}")
        for name, passed in checks.items():
            log(f"{'PASS' if passed else 'FAIL'}: {name}")
        ok = all(checks.values())
    finally:
        if mlflow is not None:
            mlflow.terminate()
            mlflow.wait(10)
        for p in processes_under(work):
            kill_tree(p.pid)
        log(f"stopped every Ray process under {work} and the mlflow server")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    log("cluster check " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except OSError:
        return False


def _job_status(address: str) -> str | None:
    """The job's final status (SUCCEEDED, FAILED, STOPPED), or None while it runs."""
    from ray.job_submission import JobSubmissionClient

    status = JobSubmissionClient(address).get_job_status("lamp-cluster-check")
    return status.value if status.is_terminal() else None


if __name__ == "__main__":
    sys.exit(main())
