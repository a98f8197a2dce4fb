"""cluster.yaml is a cluster-launcher config Ray itself accepts, and it exposes nothing."""

import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster_config():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_ray_schema_and_validator_accept_it(cluster_config):
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json"
    jsonschema.validate(cluster_config, json.loads(schema_path.read_text()))
    validate_config(prepare_config(cluster_config))  # what `ray up` runs


def test_gpu_workers_autoscale_from_zero(cluster_config):
    workers = {name: node for name, node in cluster_config["available_node_types"].items()
               if name != cluster_config["head_node_type"]}
    assert workers and all(node.get("min_workers", 0) == 0 for node in workers.values())
    assert all(node["resources"].get("GPU", 0) >= 1 for node in workers.values())
    assert cluster_config["available_node_types"]["head"]["resources"].get("GPU", 0) == 0
    assert cluster_config["idle_timeout_minutes"] > 0


def test_only_ssh_is_open_and_dashboard_binds_to_localhost(cluster_config):
    permissions = cluster_config["provider"]["security_group"]["IpPermissions"]
    assert [(p["FromPort"], p["ToPort"]) for p in permissions] == [(22, 22)]
    head_start = " ".join(cluster_config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start


def test_every_node_installs_the_project(cluster_config):
    assert cluster_config["file_mounts"]["~/crossdet_ray"] == "."
    assert any("pip install" in c and "crossdet_ray" in c for c in cluster_config["setup_commands"])


def test_every_worker_type_has_an_instance_profile_for_the_buckets(cluster_config):
    # Tune uploads each trial's checkpoints from the trial's node, and the node fetches the
    # bucket dataset itself: Ray's launcher gives the head a profile, the workers none.
    head = cluster_config["head_node_type"]
    workers = {name: node for name, node in cluster_config["available_node_types"].items()
               if name != head}
    for name, node in workers.items():
        profile = node["node_config"].get("IamInstanceProfile") or {}
        assert profile.get("Arn", "").startswith("arn:aws:iam::"), name
        assert ":instance-profile/" in profile["Arn"], name
    # The policy the comments ask for: read the data bucket, write (and prune) the run bucket.
    text = (ROOT / "cluster.yaml").read_text()
    for action in ("s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                   "iam:PassRole"):
        assert action in text, action
