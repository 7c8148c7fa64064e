"""The two Ray nodes and the MLflow server on the head: starting, asking and stopping them."""

import os
import signal
import subprocess
import urllib.request

from harness import BIN, SYSTEM_PATH, HarnessError, Refused, free_port, log, sh, tail, wait_for
from namespaces import Layout, Link, descendants, in_worker, kill_all, netns_processes

OBJECT_STORE = 500 * 2 ** 20  # per node: small grids, and a good neighbour to other Ray clusters here
# An `mlflow server` that only tracks: by default MLflow 3 starts six job-runner processes
# beside it (its GenAI jobs, which lamp-grid never asks for) that poll for work, a fifth
# of a core between them (ray_cluster.yaml's head turns them off too).
TRACKING_ONLY = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


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
                env={**self.head_env, **TRACKING_ONLY}, cwd=work, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

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
