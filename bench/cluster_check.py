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
examples in SHARED: Full_Random's rankers read them), then a 3-cell grid (LaMP_2, tiny model,
retrievers none, BM25 and Random) submitted with `ray job submit --working-dir .`
and `--retries 0`: nothing is killed, so no trial may fail, and every cell must
end FINISHED once.
Phase B: the same grid under another name; once a cell has logged train_loss
(two epochs of it, so that a checkpoint exists) the worker node is killed
(SIGKILL of every process in its namespaces) and started again in the same
namespaces: Tune retries the trial, and every cell must end FINISHED once,
nothing left RUNNING. The output says where the retry began (a checkpoint or
epoch 0).

    .venv/bin/python bench/cluster_check.py [--users 120] [--phases AB|A|B|setup] [--keep] [--timeout 1500]

as root. The worker node's MLflow clients retry 3 times, quickly, not 7 times over
minutes: a server they cannot reach fails a trial in seconds.

It prints PASS or FAIL per check, then a summary. Exit status 0 when every check
passes, 1 when one fails, 77 (and one line saying why) when this machine refuses
namespaces. It stops only what it started (another Ray cluster on the machine is
left alone), then removes the namespaces, the veth pair and, unless --keep, its
directory (under /var/tmp, outside the /tmp it hides from the worker).
"""

import argparse
import ipaddress
import json
import os
import random
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
REFUSED = 77  # the machine will not make namespaces: no verdict, a reason
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OBJECT_STORE = 500 * 2 ** 20  # per node: small grids, and a good neighbour to other Ray clusters here
# Six short epochs (a second each here): phase B's kill lands between the first
# train_loss and the trial's end with seconds to spare.
TRAINING = {"epochs": 6, "lr": 3e-3, "batch_size": 8, "beams": 1, "max_prompt_tokens": 96}
CELLS = 3


def grid_spec(name: str) -> dict:
    return {"name": name, "tasks": ["LaMP_2"], "model": "tiny",
            "axes": [{"retriever": ["none", "BM25", "Random"], "k": [2]}], "training": TRAINING}


class Refused(Exception):
    """This machine will not build the namespaces (not root, no `ip netns`, no unshare)."""


class HarnessError(Exception):
    """The check's own set-up failed: no verdict on the product."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def tail(text: str, lines: int) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEADLINE = [float("inf")]  # the whole check's end (--timeout): every wait stops there


def within(timeout: float) -> float:
    """`timeout`, or less: what is left of the whole check's time."""
    return max(1.0, min(timeout, DEADLINE[0] - time.time()))


def wait_for(what: str, check, timeout: float, every: float = 1.0):
    timeout = within(timeout)
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")


def sh(args, env=None, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    args = [str(a) for a in args]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=within(timeout))
    if check and done.returncode != 0:
        raise HarnessError(f"{shlex.join(args)} exited {done.returncode}:\n{tail(done.stdout + done.stderr, 20)}")
    return done


# --- the layout: what each node sees -------------------------------------------------------


@dataclass
class Layout:
    base: Path

    @property
    def head(self) -> Path:
        """Hidden from the worker: everything the head keeps on its own disk."""
        return self.base / "head"

    @property
    def data(self) -> Path:
        return self.head / "data"

    @property
    def workdir(self) -> Path:
        return self.head / "work"

    @property
    def head_ray(self) -> Path:
        return self.head / "ray"

    @property
    def head_token(self) -> Path:
        return self.head / "auth_token"

    @property
    def shared(self) -> Path:
        """The cluster's shared file system: both nodes see it."""
        return self.base / "shared"

    @property
    def cache(self) -> Path:
        return self.shared / "cache"

    @property
    def storage(self) -> Path:
        return self.shared / "ray_results"

    @property
    def worker(self) -> Path:
        """The worker node's own disk (the head could read it; nothing of ours does)."""
        return self.base / "worker"

    def make(self) -> None:
        for d in (self.data, self.workdir, self.head_ray, self.cache, self.storage, self.worker / "ray",
                  self.worker / "home", self.worker / "tmp"):
            d.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(32)
        for path in (self.head_token, self.worker / "auth_token"):  # every node holds its copy
            path.write_text(token)
            path.chmod(0o600)


# --- the network and mount namespaces -----------------------------------------------------


@dataclass
class Link:
    ns: str
    head_if: str
    worker_if: str
    net: ipaddress.IPv4Network

    @property
    def head_ip(self) -> str:
        return str(self.net[1])

    @property
    def worker_ip(self) -> str:
        return str(self.net[2])


def networks_in_use() -> list:
    """Every IPv4 network this machine has an address in or a route to."""
    found = []
    for args, column in ((["ip", "-4", "-o", "addr", "show"], 3), (["ip", "-4", "route", "show", "table", "all"], 0)):
        for line in sh(args, check=False).stdout.splitlines():
            fields = line.split()
            if len(fields) > column and fields[column][0].isdigit():
                try:
                    found.append(ipaddress.ip_network(fields[column], strict=False))
                except ValueError:
                    pass
    return found


def pick_link() -> Link:
    """A /30 in 10.251.0.0/16 that nothing on this machine uses, and names for it."""
    taken = networks_in_use()
    for _ in range(200):
        net = ipaddress.ip_network(f"10.251.{random.randrange(256)}.{4 * random.randrange(64)}/30")
        if not any(net.overlaps(t) for t in taken):
            tag = secrets.token_hex(3)
            return Link(f"lgw-{tag}", f"lgwh-{tag}", f"lgww-{tag}", net)
    raise HarnessError("no free /30 in 10.251.0.0/16")


def make_link(link: Link) -> None:
    """The worker's network namespace and the veth pair to it; Refused if the machine says no."""
    steps = [["ip", "netns", "add", link.ns],
             ["ip", "link", "add", link.head_if, "type", "veth", "peer", "name", link.worker_if],
             ["ip", "link", "set", link.worker_if, "netns", link.ns],
             ["ip", "addr", "add", f"{link.head_ip}/30", "dev", link.head_if],
             ["ip", "link", "set", link.head_if, "up"],
             ["ip", "netns", "exec", link.ns, "ip", "addr", "add", f"{link.worker_ip}/30", "dev", link.worker_if],
             ["ip", "netns", "exec", link.ns, "ip", "link", "set", link.worker_if, "up"],
             ["ip", "netns", "exec", link.ns, "ip", "link", "set", "lo", "up"]]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise Refused(f"`{shlex.join(step)}` failed: {error}") from None
        if done.returncode != 0:
            raise Refused(f"`{shlex.join(step)}` failed: {' '.join(done.stderr.split())}")


def remove_link(link: Link) -> None:
    """The veth pair and the network namespace, whatever of them exists."""
    subprocess.run(["ip", "link", "del", link.head_if], capture_output=True)
    subprocess.run(["ip", "netns", "del", link.ns], capture_output=True)


def start_worker_namespaces(link: Link, layout: Layout) -> subprocess.Popen:
    """A process that holds the worker's mount namespace (inside its network
    namespace) open: the head's directory under an empty read-only tmpfs, /tmp and
    /dev/shm under empty ones. Every worker command enters it with nsenter."""
    hide_ro = [layout.head]
    hide_rw = ["/dev/shm"]
    # /tmp too, unless what the worker must see lives there (a clone of the repository, its venv).
    if not any(Path(p).resolve().is_relative_to("/tmp") for p in (layout.base, ROOT, sys.prefix)):
        hide_rw.append("/tmp")
    script = "set -e\n" + "".join(
        f"mount -t tmpfs -o ro,size=64k lgw-hidden {shlex.quote(str(d))}\n" for d in hide_ro) + "".join(
        f"mount -t tmpfs -o mode=1777 lgw-worker {shlex.quote(str(d))}\n" for d in hide_rw) + \
        "echo ready\nexec sleep infinity >/dev/null 2>&1\n"
    try:
        holder = subprocess.Popen(["ip", "netns", "exec", link.ns, "unshare", "--mount", "--propagation", "private",
                                   "--", "/bin/sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True)
    except OSError as error:
        raise Refused(f"cannot run unshare in {link.ns}: {error}") from None
    ready, _, _ = select.select([holder.stdout], [], [], 30)
    if not ready or holder.stdout.readline().strip() != "ready":
        holder.kill()
        said = " ".join(holder.communicate()[1].split())[:300]
        raise Refused(f"no mount namespace for the worker (unshare --mount, tmpfs mounts): {said or 'timed out'}")
    return holder


def in_worker(holder: subprocess.Popen, args) -> list:
    """A command line that runs `args` on the worker: in its namespaces, from the repository."""
    return ["nsenter", f"--target={holder.pid}", "--net", "--mount", "--", "/bin/sh", "-c", 'cd "$0" && exec "$@"',
            str(ROOT), *map(str, args)]


def netns_processes(link: Link, spare: int) -> list:
    """Every process in the worker's network namespace but `spare` (the namespace holder)."""
    inode = os.stat(f"/run/netns/{link.ns}").st_ino
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != spare and os.stat(f"/proc/{p.pid}/ns/net").st_ino == inode:
                found.append(p)
        except (OSError, psutil.Error):
            pass
    return found


def kill_all(processes: list) -> int:
    """SIGKILL, as a lost machine would; returns how many. Waits until they are gone,
    reaping those that became this process's children (see adopt_orphans)."""
    for p in processes:
        try:
            p.kill()
        except psutil.Error:
            pass
    pending, deadline = {p.pid for p in processes}, time.time() + 15
    while pending and time.time() < deadline:
        for pid in list(pending):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not ours to reap: its parent will
                pass
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    pending.discard(pid)
            except psutil.NoSuchProcess:
                pending.discard(pid)
        time.sleep(0.1)
    return len(processes)


def adopt_orphans() -> None:
    """Makes this process the child subreaper of what it starts: the daemons `ray start`
    leaves behind (and theirs) stay its descendants, so that cleanup finds every process
    of this check, and no other, even those that renamed themselves (ray::DashboardAgent)."""
    import ctypes

    pr_set_child_subreaper = 36
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0) != 0:
        raise Refused(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")


def descendants() -> list:
    return psutil.Process().children(recursive=True)


# --- the cluster ---------------------------------------------------------------------------


class Cluster:
    """The two Ray nodes and the MLflow server, and how to reach them."""

    def __init__(self, layout: Layout, link: Link):
        self.layout, self.link = layout, link
        self.gcs, self.dashboard, self.mlflow_port = free_port(), free_port(), free_port()
        self.holder = None
        self.mlflow = None
        auth = {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
        # What a user on the head has: this environment, the venv first, the token.
        self.head_env = {**os.environ, **auth, "PATH": f"{BIN}:{os.environ.get('PATH', SYSTEM_PATH)}",
                         "RAY_AUTH_TOKEN_PATH": str(layout.head_token)}
        self.head_env.pop("RAY_ADDRESS", None)
        # The worker machine's own: nothing inherited from here but the image (the venv) and the locale.
        # Its MLflow clients give up after 3 quick retries, not 7 slow ones (minutes): an
        # unreachable server fails a trial in seconds.
        self.worker_env = {"PATH": f"{BIN}:{SYSTEM_PATH}", "HOME": str(layout.worker / "home"),
                           "TMPDIR": str(layout.worker / "tmp"), "LANG": os.environ.get("LANG", "C.UTF-8"),
                           **auth, "RAY_AUTH_TOKEN_PATH": str(layout.worker / "auth_token"),
                           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
        # Ray's own helpers inside workers (Train's placement-group cleaner) find their
        # cluster by RAY_ADDRESS; on the head, another Ray on this machine would leave them guessing.
        self.worker_env["RAY_ADDRESS"] = self.address
        self.node_env = {**self.head_env, "RAY_ADDRESS": self.address}

    @property
    def address(self) -> str:
        return f"{self.link.head_ip}:{self.gcs}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    @property
    def tracking_uri(self) -> str:
        """As a user on the head writes it."""
        return f"http://127.0.0.1:{self.mlflow_port}"

    def start_head(self) -> None:
        sh([BIN / "ray", "start", "--head", f"--node-ip-address={self.link.head_ip}", f"--port={self.gcs}",
            "--num-cpus=0", f"--object-store-memory={OBJECT_STORE}", f"--temp-dir={self.layout.head_ray}",
            "--include-dashboard=true", "--dashboard-host=0.0.0.0", f"--dashboard-port={self.dashboard}",
            f"--ray-client-server-port={free_port()}", *agent_ports()], self.node_env, timeout=180)

    def start_worker(self) -> None:
        """`ray start` on the worker, joining the head across the veth (its own ports: its own network)."""
        reach = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10).close()"
        if sh(in_worker(self.holder, [BIN / "python", "-c", reach, self.link.head_ip, self.gcs]), self.worker_env,
              check=False).returncode != 0:
            raise Refused(f"nothing in {self.link.ns} reaches the head at {self.address} over the veth pair "
                          "(a firewall on this machine?)")
        sh(in_worker(self.holder, [BIN / "ray", "start", f"--address={self.address}",
                                   f"--node-ip-address={self.link.worker_ip}", "--num-cpus=2",
                                   '--resources={"trial_node": 1}', f"--object-store-memory={OBJECT_STORE}",
                                   f"--temp-dir={self.layout.worker / 'ray'}", *agent_ports()]),
           self.worker_env, timeout=180)

    def nodes(self) -> list:
        """(node id, ip, state) of every node the head knows."""
        from ray.util.state import list_nodes

        try:
            nodes = list_nodes(address=self.dashboard_url, raise_on_missing_output=False)
        except Exception as error:  # a busy dashboard: no answer this time, ask again
            log(f"(the dashboard did not list the nodes: {str(error).splitlines()[0][:200]})")
            return []
        return [(n.node_id, n.node_ip, n.state) for n in nodes]

    def alive_worker(self) -> str | None:
        alive = [n for n, ip, state in self.nodes() if ip == self.link.worker_ip and state == "ALIVE"]
        return alive[0] if alive else None

    def start_mlflow(self) -> None:
        work = self.layout.workdir
        port = self.mlflow_port
        # Host headers this server answers: the head's loopback and its address on the link.
        hosts = ",".join(f"{h}:{port}" for h in ("127.0.0.1", "localhost", self.link.head_ip))
        # (MLflow's default list, localhost and private ranges, holds 10.251.X.1 too; said
        # here, it is what a head at a public address or a host name would need. Its
        # /health answers any Host: reachability is checked on the API.)
        with open(self.layout.head / "mlflow.log", "w") as out:
            self.mlflow = subprocess.Popen(
                [BIN / "mlflow", "server", "--host", "0.0.0.0", "--port", str(port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}", "--artifacts-destination",
                 str(work / "mlartifacts"), "--allowed-hosts", hosts],
                env=self.head_env, cwd=work, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_mlflow(self) -> None:
        wait_for("the mlflow server", lambda: answers(f"{self.tracking_uri}/health") or self.mlflow.poll(), 300)
        if self.mlflow.poll() is not None:
            raise HarnessError(f"mlflow server exited:\n{tail((self.layout.head / 'mlflow.log').read_text(), 20)}")

    def kill_worker(self) -> int:
        """The worker machine goes away: every process in its namespaces, SIGKILL."""
        return kill_all(netns_processes(self.link, self.holder.pid))

    def stop(self) -> None:
        """Everything this check started, and nothing else."""
        if self.holder is not None:
            killed = kill_all(netns_processes(self.link, self.holder.pid))
            self.holder.kill()
            self.holder.wait(10)
            log(f"stopped the worker node ({killed} processes) and its namespace holder")
        if self.mlflow is not None and self.mlflow.poll() is None:
            os.killpg(self.mlflow.pid, signal.SIGTERM)
            try:
                self.mlflow.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.mlflow.pid, signal.SIGKILL)
        rest = descendants()  # the head's processes, and anything else this check started
        kill_all(rest)
        try:  # the last zombies among them
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        log(f"stopped the head and the mlflow server ({len(rest)} processes)")


def agent_ports() -> list:
    """A node's agent ports, chosen here: Ray's fixed defaults would clash with any other
    Ray on this machine, and with ports Ray picks itself the raylet waits for its agents
    to write theirs to a file, and gives up (a crash) when a busy machine is slow to."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except OSError:
        return False


# What the worker sees, asked from inside its namespaces.
PROBE = r"""
import json, os, sys, urllib.error, urllib.request
head_dir, marker, via_link, via_loopback = sys.argv[1:5]
def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError as e:
        return f"{type(e).__name__}: {e}"
print(json.dumps({"head_dir": sorted(os.listdir(head_dir)), "shared": os.path.exists(marker),
                  "via_link": get(via_link), "via_loopback": get(via_loopback)}))
"""


# --- checks ----------------------------------------------------------------------------------


class Checks:
    def __init__(self):
        self.results = []

    def record(self, name: str, passed: bool, detail: str = "") -> bool:
        self.results.append((name, bool(passed)))
        log(f"{'PASS' if passed else 'FAIL'}: {name}" + (f" ({detail})" if detail and not passed else ""))
        return bool(passed)

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(passed for _, passed in self.results)

    def summary(self) -> str:
        failed = [name for name, passed in self.results if not passed]
        return (f"{len(self.results) - len(failed)} of {len(self.results)} checks passed"
                + "".join(f"\n  FAILED: {name}" for name in failed))


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


# --- a grid as a Ray job ----------------------------------------------------------------------


class GridJob:
    """One `run` of a grid, submitted to the head with `ray job submit --working-dir .`."""

    def __init__(self, cluster: Cluster, name: str, retries: int | None):
        self.cluster, self.name = cluster, name
        self.id = f"{name}-{secrets.token_hex(3)}"
        spec = cluster.layout.head / f"{name}.yaml"
        spec.write_text(yaml.safe_dump(grid_spec(name)))
        layout = cluster.layout
        self.command = ["python", "experiments.py", "run", str(spec), "--data", str(layout.data),
                        "--workdir", str(layout.workdir), "--cache", str(layout.cache),
                        "--storage", str(layout.storage), "--tracking-uri", cluster.tracking_uri,
                        "--address", cluster.address, "--resources-per-worker", '{"trial_node": 1}',
                        # --verbose: the workers' output, whose prefixes say which node ran each trial.
                        "--max-concurrent", "1", "--verbose"] + ([] if retries is None else ["--retries", str(retries)])
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(cluster.tracking_uri)

    def submit(self) -> None:
        submit = [BIN / "ray", "job", "submit", f"--address={self.cluster.dashboard_url}", "--working-dir", ROOT,
                  "--no-wait", "--submission-id", self.id, "--", *self.command]
        tries = []

        def submitted() -> bool:
            tries.append(sh(submit, self.cluster.head_env, check=False))
            return tries[-1].returncode == 0

        try:  # the head's job agent takes a while to come up after `ray start` returns
            wait_for("the job agent", submitted, 300, every=3)
        except TimeoutError:
            raise HarnessError(f"ray job submit failed {len(tries)} times; last:\n"
                               f"{tail(tries[-1].stderr, 20)}") from None
        log(f"submitted {self.id}: ray job submit --working-dir . -- {shlex.join(self.command)}")

    def status(self) -> str | None:
        """The job's final status (SUCCEEDED, FAILED, STOPPED), or None while it runs."""
        from ray.job_submission import JobSubmissionClient

        try:
            status = JobSubmissionClient(self.cluster.dashboard_url).get_job_status(self.id)
        except Exception as error:  # a busy dashboard: no answer this time, ask again
            log(f"(the dashboard did not say how job {self.id} is: {str(error).splitlines()[0][:200]})")
            return None
        return status.value if status.is_terminal() else None

    def wait(self, timeout: float) -> str:
        try:
            return wait_for(f"job {self.id}", self.status, timeout, every=5)
        except TimeoutError:
            log(f"job {self.id} still running after {timeout:.0f} s: stopping it")
            sh([BIN / "ray", "job", "stop", f"--address={self.cluster.dashboard_url}", self.id],
               self.cluster.head_env, check=False)
            return "TIMED OUT"

    def logs(self) -> str:
        done = sh([BIN / "ray", "job", "logs", f"--address={self.cluster.dashboard_url}", self.id],
                  self.cluster.head_env, check=False)
        (self.cluster.layout.base / f"{self.id}.log").write_text(done.stdout)
        return done.stdout

    def experiment(self):
        return self.client.get_experiment_by_name(self.name)

    def runs(self, role: str) -> list:
        experiment = self.experiment()
        if experiment is None:
            return []
        return [r for r in self.client.search_runs([experiment.experiment_id])
                if r.data.tags.get("lamp_grid.role") == role]

    def training_cell(self, epochs: int):
        """A RUNNING cell that has logged the training loss of `epochs` epochs, or None."""
        for run in self.runs("cell"):
            if run.info.status == "RUNNING" and len(self.client.get_metric_history(run.info.run_id,
                                                                                    "train_loss")) >= epochs:
                return run
        return None

    def first_epoch_after(self, run_id: str, moment: float) -> int | None:
        """The first epoch a cell logged a training loss for after `moment`: where its retry began."""
        later = sorted((m.timestamp, m.step) for m in self.client.get_metric_history(run_id, "train_loss")
                       if m.timestamp >= moment * 1000)
        return later[0][1] if later else None

    def trial_errors(self) -> list:
        """(file, text) of every error Tune stored for this grid's trials (on the shared storage)."""
        return [(p, p.read_text(errors="replace")) for p in sorted(self.cluster.layout.storage.glob(
            f"{self.name}-*/**/error.txt"))]

    def check(self, phase: str, status: str, logs: str, checks: Checks) -> None:
        cells, parents = self.runs("cell"), self.runs("grid")
        keys = [r.data.tags.get("cell_key") for r in cells]
        for run in cells:
            log(f"  {run.data.tags.get('cell_key')}: {run.info.status}")
        finished = [r for r in cells if r.info.status == "FINISHED"]
        without_artifacts = [r.data.tags.get("cell_key") for r in finished
                             if "predictions.json" not in {a.path for a in self.client.list_artifacts(r.info.run_id)}]
        checks.record(f"{phase}: the job SUCCEEDED", status == "SUCCEEDED", status)
        checks.record(f"{phase}: {CELLS} cells, one run each", len(keys) == CELLS == len(set(keys)), f"runs of {keys}")
        checks.record(f"{phase}: every cell FINISHED", len(cells) == CELLS == len(finished),
                      ", ".join(f"{r.data.tags.get('cell_key')} {r.info.status}" for r in cells) or "no cell runs")
        open_runs = [r for r in cells + parents if r.info.status in ("RUNNING", "SCHEDULED")]
        checks.record(f"{phase}: nothing RUNNING or SCHEDULED", not open_runs, f"{len(open_runs)} open run(s)")
        checks.record(f"{phase}: the parent run FINISHED", len(parents) == 1 and parents[0].info.status == "FINISHED",
                      ", ".join(r.info.status for r in parents) or "no parent run")
        checks.record(f"{phase}: every finished cell's artifacts reached the server",
                      finished and not without_artifacts, f"none from {without_artifacts or 'any cell'}")
        # Ray prefixes a remote actor's output with its node's address (none: the driver's own node).
        where = {ip or "the head" for ip in re.findall(
            r"\((?:run_trial|TrainController|RayTrainWorker) pid=\d+(?:, ip=([\d.]+))?\)", logs)}
        checks.record(f"{phase}: the trials ran on the worker node", where == {self.cluster.link.worker_ip},
                      f"they ran on {sorted(where) or 'no node'}")

    def prelude(self, logs: str) -> str:
        """What the grid's driver said before its first trial (where it put the model, the URI trials use)."""
        lines = logs.split("Running entrypoint", 1)[-1].split("Trial status:", 1)[0].splitlines()[1:]
        return "\n".join(line for line in lines if line.strip() and "Writing model shards" not in line
                         and not line.startswith(("╭", "│", "├", "╰")))  # Tune's configuration table

    def explain(self, logs: str) -> None:
        """What went wrong, for whoever reads the output: the job's log and the trials' errors."""
        log(f"job {self.id}'s log ends:\n{tail(logs, 40)}")
        shown = set()
        for path, text in self.trial_errors():
            where, last = path.relative_to(self.cluster.layout.base), tail(text, 1)
            log(f"trial error {where}:\n" + (f"(as above) {last}" if last in shown else tail(text, 25)))
            shown.add(last)


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
    job = GridJob(cluster, "cluster-check-a", retries=0)
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
    job = GridJob(cluster, "cluster-check-b", retries=None)
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


def refuse_early() -> None:
    if os.geteuid() != 0:
        raise Refused("not root: building network and mount namespaces needs root")
    for tool in ("ip", "unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            raise Refused(f"no `{tool}` on PATH")


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
            "--users", args.users], cluster.head_env)
        log(f"set up in {time.time() - started:.0f} s")
        if check_isolation(cluster, checks):
            if "A" in args.phases:
                begun = time.time()
                phase_a(cluster, checks)
                log(f"phase A took {time.time() - begun:.0f} s")
            if "B" in args.phases:
                if checks.ok:
                    begun = time.time()
                    phase_b(cluster, checks)
                    log(f"phase B took {time.time() - begun:.0f} s")
                else:
                    log("SKIP: B (phase A failed; run it alone with --phases B)")
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
