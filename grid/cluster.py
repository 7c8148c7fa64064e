"""Connecting to Ray: a local cluster by default, or the one at --address."""

import logging
import os
import socket

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
    env = dict(WORKER_ENV) if joins else {**WORKER_ENV, **LOCAL_ENV}
    if not _has_gpu():  # DeepSpeed reads it in every worker: CPU-only machines need it
        env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cpu")
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


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def check_reachable(address: str, timeout: float = 5) -> None:
    """Ray waits minutes on a wrong address; a TCP connect says so in seconds."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as error:
        raise LampError(f"cannot reach Ray at {address}: {error}") from None
