"""Connecting to Ray (a local cluster by default, or the one at --address), and
what a grid needs of the cluster: room for its trials, now or once the
autoscaler starts a node, and locations every node can reach."""

import logging
import os
import socket
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from grid.environment import CPU_KERNELS, environ_with
from grid.storage import is_uri
from grid.tracking import check_server
from lamp.errors import LampError

# For every Ray worker of ours. A trial's Ray Train controller polls its workers
# every 2 s by default: at the start and end of every trial, that is waiting.
# Tune's reporter shows a trial's progress, so Ray Data's bars inside trials only
# flood the console.
# Renderers run one per CPU: the tokenizer's own thread pool would only compete with them.
# The CPU kernels are pinned so that a CPU model does not change the numbers (grid/environment.py).
WORKER_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
              "TOKENIZERS_PARALLELISM": "false", **CPU_KERNELS}
# On a local cluster, two more actors per trial do nothing but cost CPU: the
# preemption watcher (for cloud spot nodes) and the Train metrics exporter.
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0"}


def ensure_ray(address: str | None = None, log=print, verbose: bool = False) -> None:
    """Starts (or joins) Ray once per process, with a clear error if it cannot.
    Unless verbose, the workers' output stays in Ray's log files and Ray Data logs
    only warnings: what goes wrong in a worker reaches us as the task's or the
    trial's error, and the rest (Train's per-report lines, weight-loading bars,
    library warnings, Ray Data's progress log) is chatter."""
    import ray

    if ray.is_initialized():
        return
    if not verbose:
        quiet_ray_data()
    if address and address != "auto":
        check_reachable(address)
    # Inside `ray job submit`, RAY_ADDRESS names the cluster the job runs on.
    joins = address or os.environ.get("RAY_ADDRESS")
    # Nothing about hardware is decided here: this may be a CPU head, and each
    # Train worker sets DeepSpeed's accelerator from the device Ray gave it.
    try:
        if joins:  # the cluster's workers get our variables from the job's runtime environment
            context = ray.init(address=joins, logging_level=logging.WARNING,
                               runtime_env={"env_vars": WORKER_ENV}, log_to_driver=verbose)
        else:
            context = start_local_ray(log_to_driver=verbose)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise LampError(f"cannot reach Ray at {address or 'a new local cluster'}: "
                        f"{str(error).splitlines()[0]}") from None
    if context.dashboard_url:
        log(f"Ray dashboard: http://{context.dashboard_url}" + ("" if joins else " (until this command ends)"))


def start_local_ray(**init_args):
    """A new local Ray cluster whose processes, and so every worker, have WORKER_ENV
    and LOCAL_ENV in their environment; this process keeps its own.

    Not a runtime environment, as a joined cluster needs: a worker with one starts
    through Ray's setup_worker.py, a second Python start (0.35 CPU-s and 0.35 s more
    per worker here: Ray Data's actors, Tune's trial drivers), and the workers Ray
    starts ahead of time, which have none, go unused.
    A local cluster starts Ray's dashboard (Ray's default: where it can, and no
    failure if it cannot). Ray Train's placement-group cleaners ask its State API
    every second whether their run's controller is alive, warning on every try
    without it; and it shows the trials' actors.
    "local": a new local cluster, as the user asked. Ray would otherwise join the
    cluster its file /tmp/ray/ray_current_cluster names, which a `ray start` (or
    one that died) left there, and wait on it."""
    import ray

    with environ_with({**WORKER_ENV, **LOCAL_ENV}):  # read once, as Ray starts its processes
        return ray.init(address="local", logging_level=logging.WARNING, **init_args)


def quiet_ray_data() -> None:
    """Ray Data's logger at WARNING, and not even that for its progress bars: its
    progress, logged line by line where stdout is no terminal, would fill the console.
    A split with fewer row groups than rankers leaves some idle, and that is all Ray
    Data's warning about it says."""
    import ray.data  # noqa: F401 (it sets up its loggers on import; ours come after)

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")


def other_nodes() -> list:
    """The alive Ray nodes other than this process's own."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]


# The autoscaler's config as `ray up` leaves it on the head node, each node type's
# resources filled in from its instance type.
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
# GPU memory (GiB, per GPU) of AWS's NVIDIA instance families, from AWS's list of
# accelerated computing instance types (aws.amazon.com/ec2/instance-types, 2026):
# what a GPU node type offers before any node of it is up.
AWS_GPU_GIB = {"g4dn": 16, "g5": 24, "g6": 24, "g6e": 48, "gr6": 24, "p3": 16, "p3dn": 32, "p4d": 40, "p4de": 80,
               "p5": 80, "p5e": 141, "p5en": 141}


@dataclass(frozen=True)
class NodeType:
    """A worker node type the cluster's autoscaler may start."""
    resources: dict  # what Ray offers on one node: CPU, GPU, memory, custom resources
    max_nodes: int  # -1: no limit
    instance_type: str | None = None  # the cloud's machine type, where the config names one

    @property
    def gpu_bytes(self) -> float | None:
        """Memory of one of its GPUs, where the instance type is a known GPU type."""
        family = (self.instance_type or "").split(".")[0]
        return AWS_GPU_GIB[family] * 2 ** 30 if family in AWS_GPU_GIB else None


def joined() -> bool:
    """Whether this process joined a running cluster (by address, or as a Ray job),
    rather than starting a local one: another machine may then run its trials,
    even when no other node is up yet."""
    import ray._private.worker

    node = ray._private.worker._global_node  # None for a Ray client (ray://)
    return node is None or not node.head


def autoscaler_node_types() -> list:
    """The worker NodeTypes the autoscaler may start, from the config `ray up` leaves
    on the head node (where `ray job submit` runs the driver); empty where there is
    none (a local cluster, or a driver on a machine that is not the head)."""
    import yaml

    path = Path(BOOTSTRAP_CONFIG).expanduser()
    if not path.exists():
        return []
    config = yaml.safe_load(path.read_text()) or {}
    types = []
    for name, node_type in (config.get("available_node_types") or {}).items():
        most = node_type.get("max_workers", config.get("max_workers", -1))
        if name != config.get("head_node_type") and most != 0:
            types.append(NodeType(dict(node_type.get("resources") or {}), most,
                                  (node_type.get("node_config") or {}).get("InstanceType")))
    return types


def spans_other_nodes() -> bool:
    """Whether trials may run on a machine other than this one: another node is up,
    or this process joined a cluster, whose autoscaler may start one."""
    return joined() or bool(other_nodes())


def gpu_memory(log) -> float | None:
    """Bytes of the smallest GPU the cluster's trials may get: on the GPU nodes that
    are up (asked with nvidia-smi), else on the GPU node types the autoscaler may
    start (by instance type). None, said in a line, where neither tells."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
    if nodes:
        # nvidia-smi sees every GPU of its node whatever CUDA_VISIBLE_DEVICES says, so
        # the task asks Ray for no GPU of its own.
        probe = ray.remote(num_cpus=0, max_retries=0)(gpu_memory_here)
        asks = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
                for n in nodes]
        ready, _ = ray.wait(asks, num_returns=len(asks), timeout=60)
        found = [m for m in ray.get(ready) if m]
        if found:
            return min(found)
    startable = [t for t in autoscaler_node_types() if t.resources.get("GPU")]
    known = [t.gpu_bytes for t in startable if t.gpu_bytes]
    if known and len(known) == len(startable):
        return min(known)
    unknown = ", ".join(sorted({t.instance_type or "unnamed" for t in startable if not t.gpu_bytes}))
    log("GPU memory: no GPU node is up to ask" + (f", and the GPU memory of instance type(s) {unknown} is not "
                                                  "known here" if unknown else "")
        + "; cells are not checked against it")
    return None


def gpu_memory_here() -> float | None:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return min(float(line) for line in out.split()) * 2 ** 20  # MiB
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def check_nodes_reach(paths: dict, urls: dict, timeout: float = 120) -> None:
    """Every other alive node sees each local path (label -> directory) and gets an
    answer from each URL (label -> URL), or a LampError naming the node and what it
    cannot reach. A task pinned to each node looks for a marker file written here."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = other_nodes()
    if not nodes or not (paths or urls):
        return
    token = uuid.uuid4().hex
    markers = {label: Path(directory) / f".lamp-grid-reach-{token}" for label, directory in paths.items()}
    for marker in markers.values():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    try:
        probe = ray.remote(num_cpus=0, max_retries=0)(reach_from_here)
        asks = {node["NodeManagerAddress"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node["NodeID"], soft=False)).remote({k: str(v) for k, v in markers.items()}, urls)
                for node in nodes}
        ready, _ = ray.wait(list(asks.values()), num_returns=len(asks), timeout=timeout)
        problems = []
        for address, ask in asks.items():
            missing = ray.get(ask) if ask in ready else [f"did not answer in {timeout:.0f} s"]
            problems += [f"node {address}: {m}" for m in missing]
    finally:
        for marker in markers.values():
            marker.unlink(missing_ok=True)
    if problems:
        raise LampError("the cluster's other nodes cannot reach what this command would hand them:\n  "
                        + "\n  ".join(problems) + "\nGive paths every node shares (NFS) or URIs (s3://...), "
                        "and a tracking server every node can reach.")


def reach_from_here(markers: dict, urls: dict) -> list:
    """On a node: what of the markers and URLs it cannot reach, in words."""
    import urllib.request

    missing = [f"{label} {Path(marker).parent} is not there (a directory on the head's disk only?)"
               for label, marker in markers.items() if not Path(marker).exists()]
    for label, url in urls.items():
        try:
            urllib.request.urlopen(url, timeout=10).close()
        except OSError as error:
            missing.append(f"{label} {url}: {error}")
    return missing


def check_reachable(address: str, timeout: float = 5) -> None:
    """Ray waits minutes on a wrong address; a TCP connect says so in seconds."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as error:
        raise LampError(f"cannot reach Ray at {address}: {error}") from None


def check_fits(resources, log) -> None:
    """Refuse a trial that the cluster cannot place, before it waits forever. On an
    autoscaling cluster a trial fits if a node type the autoscaler can start holds
    its workers: it then waits for that node. A cluster joined from a machine that
    does not hold its autoscaler's config may still grow: it is told, not refused."""
    import ray

    total = ray.cluster_resources()
    asks = {name: amount * resources.workers_per_trial for name, amount in resources.per_worker().items()}
    asks["CPU"] += 0.01  # the trial's driver
    short = [name for name, amount in asks.items() if amount > total.get(name, 0)]
    if not short:
        return
    worker = resources.per_worker()
    startable = [t for t in autoscaler_node_types() if all(t.resources.get(n, 0) >= a for n, a in worker.items())]
    wanted = ", ".join(f"{asks[name]:g} {name}" for name in short)
    if startable:
        log(f"the cluster has no room for a trial ({wanted}) yet: trials wait for the autoscaler to start a node "
            f"with {', '.join(f'{v:g} {k}' for k, v in sorted(startable[0].resources.items()))}")
        return
    if joined() and not autoscaler_node_types():
        log(f"the cluster has no room for a trial ({wanted}) yet, and this machine holds no autoscaler config "
            f"({BOOTSTRAP_CONFIG}, on the head of a `ray up` cluster) to tell whether a node that has can start: "
            "trials wait until one joins")
        return
    name = short[0]
    raise LampError(f"a trial asks for {asks[name]:g} {name} ({resources.workers_per_trial} worker(s)), but the "
                    f"cluster has {total.get(name, 0):g}, and no node type its autoscaler can start has enough")


def trials_that_fit(resources) -> int:
    """Trials at once: as many as the cluster, at its largest, can give workers to, one
    CPU kept for Ray Data. (Tune would otherwise start every trial's driver at once,
    and they would thrash.)"""
    import ray

    total = dict(ray.cluster_resources())
    for node_type in autoscaler_node_types():
        for name, amount in node_type.resources.items():  # an unlimited node type counts as 8 nodes
            total[name] = max(total.get(name, 0), amount * (8 if node_type.max_nodes < 0 else node_type.max_nodes))
    spare = {**total, "CPU": total.get("CPU", 1) - 1}
    fits = min(spare.get(name, 0) / (amount * resources.workers_per_trial)
               for name, amount in resources.per_worker().items() if amount)
    return max(1, int(fits))


LOOPBACK = ("127.", "localhost", "::1")


def for_other_nodes(tracking_uri: str, artifacts: str, cache: str, storage: str, log) -> str:
    """Where trials on the cluster's other nodes find the tracking server, the shard
    cache and Ray's storage; a location they could not reach is mended (a loopback
    tracking address becomes this node's) or refused, before any trial starts.
    Returns the tracking URI the trials use."""
    import ray

    if not spans_other_nodes():
        return tracking_uri
    here = ray.util.get_node_ip_address()
    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https"):
        raise LampError(f"the MLflow store {tracking_uri} is a file on this machine, which trials on the "
                        "cluster's other nodes cannot write: run a tracking server here (`mlflow server --host "
                        f"0.0.0.0 --port 5000 --backend-store-uri {tracking_uri} --artifacts-destination DIR_OR_URI`)"
                        f" and pass --tracking-uri http://{here}:5000")
    if (parts.hostname or "").startswith(LOOPBACK):
        reachable = urlunsplit(parts._replace(netloc=f"{here}:{parts.port}" if parts.port else here))
        try:
            check_server(reachable)
        except LampError:
            raise LampError(f"the MLflow server at {tracking_uri} answers on this machine's loopback only, and "
                            f"trials on other nodes reach this machine at {here}: start it with `mlflow server "
                            f"--host 0.0.0.0` (or --host {here})") from None
        log(f"trials on other nodes log to {tracking_uri} as {reachable}")
        tracking_uri = reachable
    paths = {"--cache": cache, "--storage": storage}
    if artifacts.startswith("file:") or not is_uri(artifacts):  # not proxied by the server: nodes write there
        paths["the experiment's MLflow artifact location"] = urlsplit(artifacts).path or artifacts
    check_nodes_reach({label: path for label, path in paths.items() if not is_uri(path)},
                      # Its API, not /health, which MLflow answers whatever the Host header says.
                      {"the MLflow server": f"{tracking_uri.rstrip('/')}/api/2.0/mlflow/experiments/search"
                                            "?max_results=1"})
    return tracking_uri
