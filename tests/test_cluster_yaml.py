"""cluster.yaml is a cluster-launcher config Ray itself accepts, and it exposes nothing."""

import json
import os
import shlex
import subprocess
import sys
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


def test_no_rule_ray_adds_itself_and_the_dashboard_binds_to_localhost(cluster_config):
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    # Ray's launcher adds SSH from anywhere and the intra-cluster rule to the group it makes;
    # a rule repeated here would be a duplicate AWS refuses. Nothing else is opened.
    added_by_ray = _create_default_inbound_rules(["sg-0"])
    extra = cluster_config["provider"]["security_group"].get("IpPermissions", [])
    assert not [rule for rule in extra if rule in added_by_ray or rule.get("FromPort") == 22]
    assert extra == []
    head_start = " ".join(cluster_config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start


def test_every_node_installs_the_project_with_setup_shs_pins(cluster_config):
    assert cluster_config["file_mounts"]["~/crossdet_ray"] == "."
    setup = " ".join(cluster_config["setup_commands"])
    assert "-c ~/crossdet_ray/constraints.txt" in setup and "-e ~/crossdet_ray" in setup
    # One list of pins: no version written here or in setup.sh, all in constraints.txt.
    assert "==" not in setup
    assert "torch==" not in (ROOT / "setup.sh").read_text()
    constraints = (ROOT / "constraints.txt").read_text()
    for name in ("torch", "torchvision", "ray"):
        assert f"\n{name}==" in constraints, name


def test_a_node_whose_image_holds_the_pins_downloads_nothing(cluster_config):
    """This venv holds constraints.txt's versions, as a baked image does: the setup command
    that installs torch, torchvision and Ray, run with no package index at all, finds every
    one of them satisfied (a pin it did not hold would need the index, and fail)."""
    heavy = next(c for c in cluster_config["setup_commands"] if "torch torchvision" in c)
    args = shlex.split(heavy.replace("~/crossdet_ray", str(ROOT)))
    assert args[:4] == ["python3", "-m", "pip", "install"] and "-e" not in args
    result = subprocess.run([sys.executable, *args[1:], "--no-index", "--dry-run"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Would install" not in result.stdout


def test_token_authentication_on_every_node(cluster_config):
    # A token made on the laptop reaches every node; every `ray start` insists on it.
    assert cluster_config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cluster_config[commands] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), commands
    readme = (ROOT / "README.md").read_text()
    assert "ray get-auth-token --generate" in readme
    assert "RAY_AUTH_MODE=token ray job submit" in readme


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


def test_every_node_starts_from_the_current_gpu_image(cluster_config):
    # Not a fixed, ageing AMI id: AWS's parameter for its current Ubuntu 22.04 GPU base image
    # (a driver for torch's CUDA 13 build), resolved by EC2 at each launch.
    images = {node["node_config"]["ImageId"]
              for node in cluster_config["available_node_types"].values()}
    (image,) = images
    assert image.startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/")
    assert "ubuntu-22.04" in image and image.endswith("/latest/ami-id")
