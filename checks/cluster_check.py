"""A grid on two Ray nodes that share nothing but a network link and one directory.

On this one machine (as root: it builds Linux namespaces) the check makes a
cluster whose worker node sees the head only as another machine would:

- a network namespace `lgw-XXXXXX` joined to this one by a veth pair, a /30 of
  10.251.0.0/16: the head at .1 (in this namespace), the worker at .2. Each side
  has its own loopback; nothing else is routed;
- in it, a mount namespace of the worker's own, where the head's directory (its
  data, the `--workdir` with the tiny model, the MLflow store and artifacts, the
  head's Ray session) lies under an empty read-only tmpfs, and /tmp and /dev/shm
  under empty ones. The repository and its venv stay visible (the image every
  node has), and so does SHARED, the cluster's shared file system, which holds
  `--cache` and `--storage` (never `--workdir`);
- a Ray head with 0 CPUs (token auth, `--node-ip-address` its veth address), so
  that all that asks for a CPU runs on the worker node: 2 CPUs, its own
  `--temp-dir`, HOME and TMPDIR, the only node with the `trial_node` resource;
- `mlflow server` on the head (sqlite, artifacts proxied through it) on every
  interface, given to the grid as `--tracking-uri http://127.0.0.1:PORT`, as a
  user on the head writes it.

Phase A: `prepare --address HEAD_IP:PORT` run on the head (Ray Data's read tasks
and the rankers ask for CPU, so they run on the worker, which must find the
examples in SHARED: Full_Random's rankers read them), then a 2-cell grid (LaMP_2, tiny model,
retrievers BM25 and Random, whose trials read the shards from SHARED) submitted with
`ray job submit --working-dir .` and `--retries 0`: nothing is killed, so no trial may
fail, and every cell must end FINISHED once.
Phase B: a 1-cell grid (BM25); once the cell has logged train_loss
(two epochs of it, so that a checkpoint exists) the worker node is killed
(SIGKILL of every process in its namespaces) and started again in the same
namespaces: Tune retries the trial, and every cell must end FINISHED once,
nothing left RUNNING. The output says where the retry began (a checkpoint or
epoch 0).

    .venv/bin/python checks/cluster_check.py [--users 120] [--phases AB|A|B|setup] [--keep] [--timeout 1500]

as root. The worker node's MLflow clients retry 3 times, quickly, not 7 times over
minutes: a server they cannot reach fails a trial in seconds.

It prints PASS or FAIL per check, then a summary. Exit status 0 when every check
passes, 1 when one fails, 77 (and one line saying why) when this machine refuses
namespaces. It stops only what it started (another Ray cluster on the machine is
left alone), then removes the namespaces, the veth pair and, unless --keep, its
directory (under /var/tmp, outside the /tmp it hides from the worker).
"""

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from grid_job import Checks, GridJob
from harness import BIN, DEADLINE, ROOT, HarnessError, Refused, log, sh, tail, wait_for
from namespaces import (Layout, Link, adopt_orphans, in_worker, make_link, pick_link, refuse_early, remove_link,
                        start_worker_namespaces)
from two_node_cluster import Cluster

REFUSED = 77  # the machine will not make namespaces: no verdict, a reason


# What the worker sees, asked from inside its namespaces.
PROBE = r"""
import json, os, sys, urllib.error, urllib.request
head_dir, marker, via_link, via_loopback = sys.argv[1:5]
def get(url):
    try:
        with urllib.request.urlopen(url, timeout=60) as r:  # a loaded machine's server answers late
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError as e:
        return f"{type(e).__name__}: {e}"
print(json.dumps({"head_dir": sorted(os.listdir(head_dir)), "shared": os.path.exists(marker),
                  "via_link": get(via_link), "via_loopback": get(via_loopback)}))
"""


def check_isolation(cluster: Cluster, checks: Checks) -> bool:
    """The harness itself: two nodes across the link, the worker blind to the head's disk and loopback."""
    layout, link = cluster.layout, cluster.link
    marker = layout.shared / "visible-from-both"
    marker.write_text("shared")
    api = "/api/2.0/mlflow/experiments/search?max_results=1"  # /health skips MLflow's host check: ask the API
    done = sh(in_worker(cluster.holder, [BIN / "python", "-c", PROBE, layout.head, marker,
                                         f"http://{link.head_ip}:{cluster.mlflow_port}{api}",
                                         f"http://127.0.0.1:{cluster.mlflow_port}{api}"]), cluster.worker_env)
    seen = json.loads(done.stdout)
    nodes = cluster.nodes()
    return all([
        checks.record("setup: the worker node joined the head across the veth",
                      {ip for _, ip, state in nodes if state == "ALIVE"} == {link.head_ip, link.worker_ip},
                      f"nodes {nodes}"),
        checks.record("setup: the worker cannot see the head's directory", seen["head_dir"] == [],
                      f"it sees {seen['head_dir']}"),
        checks.record("setup: the worker sees the shared directory", seen["shared"]),
        checks.record(f"setup: the worker reaches the MLflow API at {link.head_ip}:{cluster.mlflow_port}",
                      seen["via_link"] == 200, f"got {seen['via_link']}"),
        checks.record("setup: the worker's 127.0.0.1 is its own (no MLflow there)",
                      not isinstance(seen["via_loopback"], int), f"got {seen['via_loopback']}"),
    ])


# --- the phases ------------------------------------------------------------------------------


def run_prepare(cluster: Cluster, checks: Checks) -> None:
    """Phase A's first step: `prepare` on the head, its Ray Data work on the cluster (the head has no CPU)."""
    layout = cluster.layout
    command = [BIN / "python", ROOT / "experiments.py", "prepare", "--data", layout.data, "--cache", layout.cache,
               "--workdir", layout.workdir, "--address", cluster.address, "--tasks", "LaMP_2",
               "--retrievers", "BM25", "Random", "Full_Random"]  # Full_Random's rankers read the examples file
    log("A: " + shlex.join(map(str, command)))
    try:
        done = sh(command, cluster.head_env, timeout=300, check=False)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as error:
        code = f"none: killed after {error.timeout:.0f} s"
        output = "".join(o.decode(errors="replace") if isinstance(o, bytes) else o
                         for o in (error.stdout, error.stderr) if o)
    print(tail(output, 8), flush=True)
    checks.record("A: prepare exited 0", code == 0, f"exit {code}:\n{tail(output, 30)}")
    said, rankers = where_prepare_ran(cluster)
    log(f"A: prepare's Ray Data work ran on: {said}")
    checks.record("A: prepare's rankers ran on the worker node", bool(rankers) and set(rankers) == {"worker"}, said)


def where_prepare_ran(cluster: Cluster) -> tuple:
    """Which node ran prepare's read tasks and rankers, from Ray's state API: (in words, the rankers' nodes)."""
    from ray.util.state import list_actors, list_tasks

    names = {node: "worker" if ip == cluster.link.worker_ip else "head" for node, ip, _ in cluster.nodes()}
    try:
        asked = dict(address=cluster.dashboard_url, limit=10000, raise_on_missing_output=False)
        # An actor Ray Data asked for and never needed has no node: it ran nowhere.
        rankers = [names.get(a.node_id, "?") for a in list_actors(**asked)
                   if "RankExamples" in (a.class_name or "") and a.node_id]
        reads = [names.get(t.node_id, "?") for t in list_tasks(**asked) if "read_row_group" in (t.name or "")]
    except Exception as error:  # say why there is no answer
        return f"(Ray's state API did not say: {str(error).splitlines()[0][:200]})", []

    def count(where: list) -> str:
        return ", ".join(f"{where.count(n)} on the {n}" for n in sorted(set(where))) or "none seen"

    return f"read tasks {count(reads)}; rankers {count(rankers)}", rankers


def phase_a(cluster: Cluster, checks: Checks) -> None:
    run_prepare(cluster, checks)
    job = GridJob(cluster, "cluster-check-a", ["BM25", "Random"], retries=0)
    job.submit()
    status = job.wait(600)
    logs = job.logs()
    log(f"A: the driver on the head said:\n{job.prelude(logs)}")
    log(f"A: job ended {status}; its log ends:\n{tail(logs, 12)}")
    job.check("A", status, logs, checks)
    checks.record("A: no trial errored (nothing was killed)", not re.search(r"Trial \S+ errored after", logs))
    if not checks.ok:
        job.explain(logs)


def phase_b(cluster: Cluster, checks: Checks) -> None:
    job = GridJob(cluster, "cluster-check-b", ["BM25"], retries=None)
    old = cluster.alive_worker()
    job.submit()
    victim = None
    try:
        # Two epochs: the trial logs an epoch's loss before it saves that epoch's checkpoint,
        # so by the second loss the first checkpoint is on its way to --storage.
        victim = wait_for("a cell in training", lambda: job.training_cell(2) or job.status(), 600, every=0.25)
    except TimeoutError:
        pass
    if isinstance(victim, str) or victim is None:
        checks.record("B: the worker node was killed in the middle of a trial", False,
                      f"the job {'ended ' + victim if victim else 'had no cell training'} first")
        logs = job.logs()
        job.check("B", job.status() or "RUNNING", logs, checks)
        job.explain(logs)
        return
    killed_at, killed = time.time(), cluster.kill_worker()
    # The kill came in time if the cell had not finished: its trial, on the worker, ends its run.
    checks.record("B: the worker node was killed in the middle of a trial",
                  job.client.get_run(victim.info.run_id).info.status == "RUNNING",
                  f"{victim.data.tags['cell_key']} was {job.client.get_run(victim.info.run_id).info.status}")
    log(f"B: killed the worker node in the middle of {victim.data.tags['cell_key']} ({killed} processes)")
    try:  # as when a spot machine goes: the head notices before a new one comes
        wait_for("the head to see the worker node dead", lambda: cluster.alive_worker() != old, 90, every=2)
    except TimeoutError as error:
        log(f"B: {error}; starting it again anyway")
    cluster.start_worker()
    wait_for("the worker node to join again", cluster.alive_worker, 120, every=2)
    log("B: started the worker node again in the same namespaces")
    status = job.wait(600)
    logs = job.logs()
    log(f"B: job ended {status}; its log ends:\n{tail(logs, 12)}")
    job.check("B", status, logs, checks)
    # Tune's own record of the loss: the trial errored, then its retry finished the cell.
    checks.record("B: the trial on the killed node errored and was retried",
                  re.search(r"Trial \S+ errored after", logs) and status == "SUCCEEDED")
    resumed = job.first_epoch_after(victim.info.run_id, killed_at)
    log(f"B: (for the record) the retry of {victim.data.tags['cell_key']} began at epoch {resumed}: "
        + ("it resumed from a checkpoint" if resumed else "it started over"))
    if not checks.ok:
        job.explain(logs)


# --- main --------------------------------------------------------------------------------------


def set_up(cluster: Cluster, users: int) -> None:
    """The worker's namespaces, the MLflow server, both Ray nodes, and the head's data."""
    layout, link = cluster.layout, cluster.link
    layout.make()
    log(f"directory {layout.base}; network namespace {link.ns}: head {link.head_ip}, worker {link.worker_ip}")
    cluster.holder = start_worker_namespaces(link, layout)
    cluster.start_mlflow()  # it takes a while to come up: meanwhile, Ray
    cluster.start_head()
    cluster.start_worker()
    wait_for("the worker node to join", cluster.alive_worker, 120, every=2)
    log(f"Ray head at {cluster.address} (0 CPUs, dashboard {cluster.dashboard_url}); worker node at "
        f"{link.worker_ip} (2 CPUs, trial_node=1)")
    cluster.wait_mlflow()
    log(f"mlflow server on 0.0.0.0:{cluster.mlflow_port}; the grid is given {cluster.tracking_uri}")
    sh([BIN / "python", ROOT / "experiments.py", "synth", "--out", layout.data, "--tasks", "LaMP_2",
        "--users", users], cluster.head_env)


def run_phases(cluster: Cluster, checks: Checks, phases: str) -> None:
    """Phase A, then phase B if A passed."""
    if "A" in phases:
        begun = time.time()
        phase_a(cluster, checks)
        log(f"phase A took {time.time() - begun:.0f} s")
    if "B" in phases:
        if checks.ok:
            begun = time.time()
            phase_b(cluster, checks)
            log(f"phase B took {time.time() - begun:.0f} s")
        else:
            log("SKIP: B (phase A failed; run it alone with --phases B)")


def interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=120, help="synthetic LaMP_2 users")
    parser.add_argument("--phases", default="AB", choices=["AB", "A", "B", "setup"],
                        help="A: prepare and a grid; B: a grid that loses its node; setup: the cluster only")
    parser.add_argument("--keep", action="store_true", help="keep the check's directory (its logs, stores, data)")
    parser.add_argument("--timeout", type=float, default=1500, help="seconds the whole check may take (then FAIL)")
    parser.add_argument("--dir", default="/var/tmp", help="where to make the check's directory (not under /tmp, "
                        "which the worker does not see)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    started = time.time()
    DEADLINE[0] = started + args.timeout
    layout = Layout(Path(tempfile.mkdtemp(prefix="lgw-", dir=args.dir)))
    link = None
    try:
        refuse_early()
        adopt_orphans()
        link = pick_link()
        make_link(link)
    except Refused as reason:
        if link is not None:
            remove_link(link)
        shutil.rmtree(layout.base, ignore_errors=True)
        print(f"cluster check: namespaces refused: {reason}", flush=True)
        return REFUSED
    cluster = Cluster(layout, link)
    checks = Checks()
    # This process asks the cluster too (nodes, jobs): the token.
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(layout.head_token))
    os.environ.pop("RAY_ADDRESS", None)
    code = 1
    try:
        set_up(cluster, args.users)
        log(f"set up in {time.time() - started:.0f} s")
        if check_isolation(cluster, checks):
            run_phases(cluster, checks, args.phases)
        code = 0 if checks.ok else 1
    except Refused as reason:
        print(f"cluster check: namespaces refused: {reason}", flush=True)
        code = REFUSED
    except (HarnessError, TimeoutError, subprocess.TimeoutExpired) as error:
        checks.record(f"harness: {str(error).splitlines()[0]}", False, tail(str(error), 20))
    except KeyboardInterrupt as error:
        log(f"interrupted ({error}): cleaning up")
        code = 130
    except Exception as error:  # a bug of the check's own: still a FAIL, still cleaned up
        checks.record(f"harness: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}", False,
                      traceback.format_exc())
    finally:
        cleanup(cluster, link, layout, args.keep)
    if code != REFUSED:
        log(checks.summary())
        log(f"cluster check {'passed' if code == 0 else 'FAILED'} in {time.time() - started:.0f} s")
    return code


def cleanup(cluster: Cluster, link: Link, layout: Layout, keep: bool) -> None:
    """Stops what this check started, then removes its veth pair, namespace and directory."""
    try:
        cluster.stop()
    except Exception as error:  # cleanup goes on whatever fails
        log(f"cleanup: stopping the cluster: {error}")
    remove_link(link)
    log(f"removed the veth pair {link.head_if} and network namespace {link.ns}")
    if keep:
        log(f"kept {layout.base}")
    else:
        shutil.rmtree(layout.base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
