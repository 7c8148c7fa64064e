"""ray_cluster.yaml passes Ray's own cluster-config validation, as `ray up` runs it,
and so does its on-premises variant (the file's comments); and what it launches
can run the project: an explicit image on every node type, workers that reach the
storage, a Python 3.11+ environment made by the set-up, and nothing git ignores
shipped to the nodes or in a job's working directory."""

import copy
import re
import zipfile
from pathlib import Path

import pytest
import yaml

CONFIG = Path(__file__).parent.parent / "ray_cluster.yaml"


def validated(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_the_cluster_config_validates():
    config = yaml.safe_load(CONFIG.read_text())
    prepared = validated(config)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and "GPU" not in types["head"]["resources"]
    assert types["gpu_worker"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert types["gpu_worker"]["min_workers"] <= types["gpu_worker"]["max_workers"]
    # Token authentication on every node, and the token shipped to them.
    starts = prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if " ray start" in c or "/ray start" in c)
    assert "~/.ray/auth_token" in prepared["file_mounts"]
    assert any("mlflow server" in c for c in prepared["head_start_ray_commands"])


def test_the_on_premises_variant_validates():
    config = yaml.safe_load(CONFIG.read_text())
    config["provider"] = {"type": "local", "head_ip": "10.0.0.1", "worker_ips": ["10.0.0.2", "10.0.0.3"]}
    config["auth"] = {"ssh_user": "ubuntu", "ssh_private_key": "~/.ssh/id_rsa"}
    del config["available_node_types"], config["head_node_type"]
    prepared = validated(config)
    assert prepared["provider"]["worker_ips"] == ["10.0.0.2", "10.0.0.3"]


@pytest.mark.parametrize("break_it", [
    lambda c: c.pop("head_node_type"),
    lambda c: c["available_node_types"]["gpu_worker"].update(min_wrkers=1),
    lambda c: c.update(max_workers=-1),
])
def test_a_broken_config_is_refused(break_it):
    config = yaml.safe_load(CONFIG.read_text())
    break_it(config)
    with pytest.raises(Exception):
        validated(config)


def test_what_it_launches_can_run_the_project():
    config = yaml.safe_load(CONFIG.read_text())
    prepared = validated(config)
    types = prepared["available_node_types"]
    for name, node_type in types.items():
        # Ray's default image otherwise: an Ubuntu 18.04 Deep Learning AMI with Python 3.6.
        assert node_type["node_config"].get("ImageId"), f"node type {name} names no image"
    # The storage is S3 (the file's --cache and --storage): every worker type reaches it through a profile.
    for name, node_type in types.items():
        if name != prepared["head_node_type"]:
            assert "IamInstanceProfile" in node_type["node_config"], f"node type {name} cannot reach S3"
    # The set-up makes its own Python 3.11+ environment, and installs the lock into it.
    setup = prepared["setup_commands"]
    versions = [tuple(map(int, m.groups())) for c in setup for m in [re.search(r"uv venv .*-p (\d+)\.(\d+)", c)] if m]
    assert versions and all(v >= (3, 11) for v in versions), setup
    assert any("-r ~/lamp-grid/requirements.lock" in c and "--python ~/venv" in c for c in setup), setup
    starts = prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"]
    assert all("~/venv/bin/" in c for c in starts if "ray start" in c)
    # The checkout goes to the nodes without what git ignores (rsync reads .gitignore as a filter).
    assert prepared["file_mounts"]["~/lamp-grid"] == "."
    assert ".gitignore" in prepared["rsync_filter"] and "**/.git" in prepared["rsync_exclude"]


def test_a_jobs_working_directory_leaves_out_what_git_ignores(tmp_path):
    """`ray job submit --working-dir .` zips the checkout with Ray's own packaging, which
    reads .gitignore: the data, the work directory, reports and the venv stay home."""
    from ray._private.runtime_env.packaging import create_package

    checkout = tmp_path / "checkout"
    for name in ("grid/run.py", "README.md", "LaMP/LaMP_2/train/train_questions.json", "lamp-grid-work/mlflow.db",
                 "reports/fig-b/report.md", ".venv/bin/python"):
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text("x")
    (checkout / ".gitignore").write_text((CONFIG.parent / ".gitignore").read_text())
    create_package(str(checkout), tmp_path / "package.zip", include_gitignore=True)
    shipped = {name for name in zipfile.ZipFile(tmp_path / "package.zip").namelist() if not name.endswith("/")}
    assert shipped == {"grid/run.py", "README.md", ".gitignore"}
