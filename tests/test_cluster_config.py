"""ray_cluster.yaml passes Ray's own cluster-config validation, as `ray up` runs it,
and so does its on-premises variant (the file's comments)."""

import copy
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
