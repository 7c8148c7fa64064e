"""A grid on a cluster that starts with no node for its trials, as `ray up` leaves
one (min_workers: 0): Ray's own autoscaler, with its fake multi-node provider,
starts the worker node the trial asks for, and the cell finishes.

The cluster runs in PID, mount and network namespaces of its own (`unshare`):
everything it starts stops with it, its ports meet no other Ray on the machine,
and what it writes under /tmp/ray stays its own. The head
has no CPU, so Ray Data's rankers and renderers and every trial run on the node the
autoscaler starts; the autoscaler's config lies where `ray up` leaves it,
~/ray_bootstrap_config.yaml (HOME is the test's). Mostly waiting on the autoscaler, it
starts with the test session and runs beside the other tests (tests/conftest.py)."""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.beside import Check

AUTOSCALER = {
    "cluster_name": "fake", "max_workers": 1, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
    "provider": {"type": "fake_multinode", "disable_node_updaters": True, "disable_launch_config_check": True},
    "auth": {"ssh_user": "ubuntu"}, "head_node_type": "ray.head.default",
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        "trial_node": {"resources": {"CPU": 2, "trial_node": 1}, "node_config": {}, "min_workers": 0,
                       "max_workers": 1}},
    **{key: [] for key in ("cluster_synced_files", "initialization_commands", "setup_commands",
                           "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
                           "worker_start_ray_commands")},
    "file_mounts": {}, "file_mounts_sync_continuously": False}
GRID = {"name": "autoscaled", "tasks": ["LaMP_2"], "model": "tiny", "axes": [{"retriever": ["BM25"], "k": [2]}],
        "training": {"epochs": 1, "lr": 1e-3, "batch_size": 8, "beams": 1}}
# Inside the namespaces: loopback up; a /tmp/ray of its own (`ray start` names its
# cluster in /tmp/ray/ray_current_cluster, which a later ray.init() outside would
# try to join); the head (no CPU, the fake autoscaler); an MLflow server the trials
# log to (without the job runners MLflow 3 starts by default: tracking needs none);
# the grid by address; then the nodes as Ray saw them.
CLUSTER = """
set -e
ip link set lo up
mkdir -p /tmp/ray && mount -t tmpfs tmpfs /tmp/ray
bin=$(dirname {python})
RAY_FAKE_CLUSTER=1 $bin/ray start --head --num-cpus=0 --port=6379 --disable-usage-stats \\
    --autoscaling-config=$HOME/ray_bootstrap_config.yaml > {tmp}/head.log 2>&1
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $bin/mlflow server --host 127.0.0.1 --port 5000 \\
    --backend-store-uri sqlite:///{tmp}/mlflow.db --artifacts-destination {tmp}/artifacts --workers 1 \\
    > {tmp}/mlflow.log 2>&1 &
for i in $(seq 120); do {python} -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health')" \\
    2>/dev/null && break; sleep 1; done
{python} experiments.py run {tmp}/grid.yaml --users 60 --workdir {tmp}/work --address 127.0.0.1:6379 \\
    --tracking-uri http://127.0.0.1:5000 --resources-per-worker '{{"trial_node": 1}}'
{python} -c "import json, ray; ray.init(address='127.0.0.1:6379', logging_level='ERROR'); \\
print('NODES', json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))"
"""


def start_cluster() -> Check | None:
    """The cluster and its grid, begun with the test session; None where namespaces cannot be made."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return None
    folder = Path(tempfile.mkdtemp(prefix="lamp-autoscaler-"))
    home = folder / "home"
    home.mkdir()
    (home / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(AUTOSCALER))
    (folder / "grid.yaml").write_text(yaml.safe_dump(GRID))
    script = CLUSTER.format(python=sys.executable, tmp=folder)
    return Check(["unshare", "--fork", "--pid", "--mount-proc", "--mount", "--net", "bash", "-c", script], folder,
                 env={**os.environ, "HOME": str(home)})


@pytest.mark.slow
@pytest.mark.beside.with_args(start_cluster)  # with_args: a lone callable would be decorated
def test_the_autoscaler_starts_the_node_a_grids_trials_wait_for(beside):
    if beside is None:
        pytest.skip("needs root and unshare(1) to give the cluster namespaces of its own")
    status, output = beside.wait(1500)
    assert status == 0, output[-8000:]
    # No node could hold a trial when the grid started: it waited for the autoscaler, not refused.
    assert "trials wait for the autoscaler to start a node with 2 CPU, 1 trial_node" in output, output
    # ... and a cluster joined by address is one whose trials run elsewhere, no other node up or not: the
    # tracking URI is made one other nodes reach (here, in a network of loopback alone, the same address).
    assert "trials on other nodes log to http://127.0.0.1:5000 as http://127.0.0.1:5000" in output
    (nodes,) = [json.loads(line.split(" ", 1)[1]) for line in output.splitlines() if line.startswith("NODES ")]
    assert len(nodes) == 2 and sum("CPU" in n for n in nodes) == 1 and any(n.get("trial_node") for n in nodes)
    client = MlflowClient(f"sqlite:///{beside.folder / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("autoscaled").experiment_id], "tags.cell_key != ''")
    (run,) = runs
    assert run.data.tags["cell_key"] == "LaMP_2/lamp/BM25/k=2/both/start/offset=0/seed=0/tiny"
    assert run.info.status == "FINISHED" and "dev_f1" in run.data.metrics
