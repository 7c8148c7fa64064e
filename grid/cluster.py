"""Connecting to Ray: a local cluster by default, or the one at --address."""

import logging
import os
import socket
import uuid
from pathlib import Path

from lamp.errors import LampError

# For every Ray worker of ours. A trial's Ray Train controller polls its workers
# every 2 s by default: at the start and end of every trial, that is waiting.
# Tune's reporter shows a trial's progress, so Ray Data's bars inside trials only
# flood the console.
WORKER_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
# On a local cluster, two more actors per trial do nothing but cost CPU: the
# preemption watcher (for cloud spot nodes) and the Train metrics exporter.
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0"}


def ensure_ray(address: str | None = None, log=print) -> None:
    """Starts (or joins) Ray once per process, with a clear error if it cannot."""
    import ray

    if ray.is_initialized():
        return
    if address and address != "auto":
        check_reachable(address)
    # Inside `ray job submit`, RAY_ADDRESS names the cluster the job runs on.
    joins = address or os.environ.get("RAY_ADDRESS")
    # Nothing about hardware is decided here: this may be a CPU head, and each
    # Train worker sets DeepSpeed's accelerator from the device Ray gave it.
    env = dict(WORKER_ENV) if joins else {**WORKER_ENV, **LOCAL_ENV}
    # A local cluster starts Ray's dashboard (Ray's default: where it can, and no
    # failure if it cannot). Ray Train's placement-group cleaners ask its State API
    # every second whether their run's controller is alive, warning on every try
    # without it; and it shows the trials' actors.
    try:
        context = ray.init(address=address, logging_level=logging.WARNING, runtime_env={"env_vars": env})
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise LampError(f"cannot reach Ray at {address or 'a new local cluster'}: "
                        f"{str(error).splitlines()[0]}") from None
    if context.dashboard_url:
        log(f"Ray dashboard: http://{context.dashboard_url}" + ("" if joins else " (until this command ends)"))


def other_nodes() -> list:
    """The alive Ray nodes other than this process's own."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]


def autoscaler_node_types() -> list:
    """(resources, most nodes; -1 for no limit) of each node type the autoscaler may
    start; empty where no autoscaler runs. Ray keeps the autoscaler's config in its GCS."""
    from ray._private.state import state

    config = state.get_cluster_config()
    return [(dict(group.resources), group.max_count) for group in (config.node_group_configs if config else ())
            if group.max_count != 0]


def spans_other_nodes() -> bool:
    """Whether trials may run on a machine other than this one: another node is up,
    or the autoscaler may start one."""
    return bool(other_nodes() or autoscaler_node_types())


def gpu_memory() -> float | None:
    """Bytes of the smallest GPU on the cluster's nodes that are up, or None where no
    GPU node is up (or none answers). nvidia-smi sees every GPU of its node whatever
    CUDA_VISIBLE_DEVICES says, so the task asks Ray for no GPU of its own."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
    probe = ray.remote(num_cpus=0, max_retries=0)(gpu_memory_here)
    asks = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in nodes]
    ready, _ = ray.wait(asks, num_returns=len(asks), timeout=60) if asks else ([], [])
    found = [m for m in ray.get(ready) if m]
    return min(found) if found else None


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
