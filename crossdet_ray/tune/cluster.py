"""The node types a cluster can have: those its autoscaler can launch, or those named by
`--plan-for`.

On an autoscaling cluster the nodes alive now say little: a `ray up cluster.yaml` cluster
starts with a CPU-only head and adds GPU workers on demand, so `--gpus-per-trial auto` must
plan for the node types the autoscaler may launch. They are read, in this order, from
- the cluster config the GCS holds (`autoscaler_pb2.ClusterConfig`, where an autoscaler
  publishes one: none of Ray 2.60's does, KubeRay's included, so rayjob.yaml mounts the node
  types on the head as the bootstrap file below; the same record Ray Data sizes itself from);
- the autoscaling config file the running autoscaler (Ray's `monitor.py`, started by
  `ray start --head --autoscaling-config=FILE`) was given: its pid is in the status the
  autoscaler writes to the GCS every update, and its command line names the file;
- `~/ray_bootstrap_config.yaml`, where `ray up` puts that file on the head.
A GPU's memory is stated by a `gpu_memory_<N>gb` custom resource of the node type (cluster.yaml).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crossdet_ray.tune.ray_compat import autoscaler_status, gcs_cluster_config
from crossdet_ray.tune.resources import (
    DEFAULT_GPU_MEMORY_GB,
    ClusterShape,
    ResourceError,
    gpu_memory_resource,
    stated_gpu_memory_gb,
)

logger = logging.getLogger(__name__)

# `ray up` writes the autoscaling config here on the head (cluster.yaml's head_start_ray_commands).
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")
# Ray's default for a cluster config without `max_workers` (ray-schema.json).
RAY_DEFAULT_MAX_WORKERS = 2
# `--plan-for` names GPUs, not CPUs: a node is assumed to have this many CPUs per GPU, as the
# common cloud GPU instances have at least (g5.2xlarge: 8 per A10G; p4d/p5: 12-24 per GPU).
PLAN_FOR_CPUS_PER_GPU = 8
# A node type without a limit (GCS max_count -1) is planned as this many nodes: more than any
# run of a few trials can use.
UNLIMITED_NODES = 64
PLAN_FOR_EXAMPLE = ("pass e.g. --plan-for 8x80 (one node of 8 GPUs of 80 GB) or "
                    "--plan-for 2x4x80 (2 nodes of 4 GPUs of 80 GB)")


class PlanForError(ResourceError):
    """A `--plan-for` that does not describe a cluster."""


class ClusterDiscoveryError(ResourceError):
    """The autoscaler's node types cannot be found or read."""


@dataclass(frozen=True)
class NodeType:
    """A kind of node the cluster may have: its resources and how many may exist."""

    name: str
    cpus: float
    gpus: float
    gpu_memory_gb: float | None  # per GPU; None where the node type does not state it
    max_workers: int
    min_workers: int = 0
    # The resource that states that memory (`gpu_memory_24gb`), which trials ask for to land
    # on this type; None where the type states none (`--plan-for` makes one up).
    gpu_memory_resource: str | None = field(default=None, compare=False)

    @property
    def total_gpus(self) -> float:
        return self.gpus * self.max_workers


# -- --plan-for --------------------------------------------------------------------------------
_PLAN_FOR_ITEM = re.compile(r"^(?:(\d+)x)?(\d+)x(\d+(?:\.\d+)?)(?:gb)?$")


def parse_plan_for(text: str) -> list[NodeType]:
    """`8x80` (8 GPUs of 80 GB, one node), `2x4x80` (2 nodes of 4 GPUs of 80 GB; `2x4x80GB`
    too); several node types separated by commas (`8x80,2x1x24`)."""
    items = [item.strip().lower() for item in text.split(",")]
    if not text.strip() or not all(items):
        raise PlanForError(f"--plan-for: '{text}' names no cluster; {PLAN_FOR_EXAMPLE}")
    node_types = []
    for item in items:
        match = _PLAN_FOR_ITEM.match(item)
        if not match:
            raise PlanForError(f"--plan-for: '{item}' is not GPUSxGB or NODESxGPUSxGB; "
                               f"{PLAN_FOR_EXAMPLE}")
        nodes = int(match.group(1)) if match.group(1) else 1
        gpus, memory_gb = int(match.group(2)), float(match.group(3))
        if nodes < 1 or gpus < 1 or not memory_gb > 0 or not math.isfinite(memory_gb):
            raise PlanForError(f"--plan-for: '{item}' needs at least 1 node, 1 GPU and more "
                               f"than 0 GB per GPU; {PLAN_FOR_EXAMPLE}")
        node_types.append(NodeType(
            name=f"plan_for_{item}", cpus=float(PLAN_FOR_CPUS_PER_GPU * gpus), gpus=float(gpus),
            gpu_memory_gb=memory_gb, max_workers=nodes, min_workers=nodes))
    return node_types


# -- the autoscaler's configuration --------------------------------------------------------------
def node_types_from_autoscaling_config(config: dict[str, Any]) -> list[NodeType]:
    """The worker node types of a Ray cluster config (`available_node_types`), head left out:
    the head is never launched, it is there already (and ray.nodes() shows it)."""
    available = config.get("available_node_types")
    if not isinstance(available, dict) or not available:
        raise ClusterDiscoveryError("--autoscaling: the autoscaler's config has no "
                                    "available_node_types; plan with --plan-for")
    cluster_max = int(config.get("max_workers", RAY_DEFAULT_MAX_WORKERS))
    head = config.get("head_node_type")
    node_types = []
    for name, spec in available.items():
        if name == head:
            continue
        resources = spec.get("resources") or {}
        node_types.append(NodeType(
            name=name, cpus=float(resources.get("CPU", 0)), gpus=float(resources.get("GPU", 0)),
            gpu_memory_gb=stated_gpu_memory_gb(resources),
            gpu_memory_resource=gpu_memory_resource(resources),
            # The cluster's max_workers caps every type as well as their sum.
            max_workers=min(int(spec.get("max_workers", cluster_max)), cluster_max),
            min_workers=int(spec.get("min_workers", 0))))
    return node_types


def _node_types_from_gcs_cluster_config(cluster_config) -> list[NodeType]:
    node_types = []
    for group in cluster_config.node_group_configs:
        resources = dict(group.resources)
        # -1: no limit; the plan then treats the type as plentiful.
        max_count = group.max_count if group.max_count >= 0 else UNLIMITED_NODES
        node_types.append(NodeType(
            name=group.name, cpus=float(resources.get("CPU", 0)),
            gpus=float(resources.get("GPU", 0)),
            gpu_memory_gb=stated_gpu_memory_gb(resources), max_workers=int(max_count),
            min_workers=int(group.min_count), gpu_memory_resource=gpu_memory_resource(resources)))
    return node_types


def _monitor_config_path() -> Path | None:
    """The `--autoscaling-config` of the cluster's autoscaler when it runs on this machine."""
    status = autoscaler_status()
    if not status:
        return None
    pid = json.loads(status).get("monitor_pid")
    try:
        args = Path(f"/proc/{int(pid)}/cmdline").read_bytes().decode().split("\0")
    except (OSError, TypeError, ValueError):  # another machine's pid, or no /proc
        return None
    if not any(arg.endswith("monitor.py") for arg in args):
        return None  # the pid is this machine's but not the autoscaler's
    for arg in args:
        if arg.startswith("--autoscaling-config="):
            return Path(arg.split("=", 1)[1])
    return None


def read_autoscaling_config(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.expanduser().read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ClusterDiscoveryError(f"--autoscaling: cannot read the autoscaler's config {path}: "
                                    f"{error}; fix it, or plan with --plan-for") from error
    if not isinstance(config, dict):
        raise ClusterDiscoveryError(f"--autoscaling: the autoscaler's config {path} is not a "
                                    "YAML mapping; fix it, or plan with --plan-for")
    return config


def launchable_node_types(config_path: str | Path | None = None) -> list[NodeType]:
    """The worker node types the connected cluster's autoscaler can launch (Ray initialised).

    `config_path` names the autoscaling config file outright; without it the GCS's cluster
    config, the running autoscaler's config file and `~/ray_bootstrap_config.yaml` are tried,
    in that order. Raises ClusterDiscoveryError when none is found.
    """
    if config_path is not None:
        return node_types_from_autoscaling_config(read_autoscaling_config(Path(config_path)))
    cluster_config = gcs_cluster_config()
    if cluster_config is not None:
        return _node_types_from_gcs_cluster_config(cluster_config)
    for path in (_monitor_config_path(), BOOTSTRAP_CONFIG.expanduser()):
        if path is not None and path.expanduser().is_file():
            logger.info("node types the autoscaler can launch: from %s", path)
            return node_types_from_autoscaling_config(read_autoscaling_config(path))
    raise ClusterDiscoveryError(
        "--autoscaling: cannot find the node types the autoscaler can launch (no cluster config "
        "in the GCS, no autoscaler on this machine, no ~/ray_bootstrap_config.yaml); run the "
        "command on the cluster's head, or name the GPUs to plan for with --plan-for, e.g. "
        "--plan-for 2x1x24")


# -- what `auto` plans for on an autoscaling cluster -----------------------------------------------
def launchable_shape(node_types: list[NodeType]) -> ClusterShape:
    """The cluster `--gpus-per-trial auto` plans for: every GPU node type at its most nodes
    (the CPU-only types, and the head, train nothing while a GPU can be had); the CPU-only
    types only where no type has a GPU."""
    launchable = [t for t in node_types if t.max_workers > 0]
    chosen = [t for t in launchable if t.gpus > 0] or launchable
    nodes = tuple({"CPU": t.cpus, "GPU": t.gpus,
                   **({t.gpu_memory_resource: 1.0} if t.gpu_memory_resource and t.gpus else {})}
                  for t in chosen for _ in range(min(t.max_workers, UNLIMITED_NODES)))
    # A GPU whose memory its node type does not state is taken to be the planner's default.
    memory = min((t.gpu_memory_gb or DEFAULT_GPU_MEMORY_GB for t in chosen if t.gpus > 0),
                 default=DEFAULT_GPU_MEMORY_GB)
    return ClusterShape(total_cpus=sum(n["CPU"] for n in nodes),
                        total_gpus=sum(n["GPU"] for n in nodes), nodes=nodes,
                        gpu_memory_gb=memory)


def autoscaling_shape(current: ClusterShape, config_path: str | Path | None = None
                      ) -> ClusterShape:
    """What `auto` plans for with `--autoscaling`: the node types the autoscaler can launch.

    Where they cannot be found, the nodes alive now do if they have a GPU; a cluster with none
    would get a plan on the CPU, so that is an error (ClusterDiscoveryError) instead.
    """
    try:
        node_types = launchable_node_types(config_path)
    except ClusterDiscoveryError:
        if current.total_gpus > 0:
            logger.warning("--autoscaling: the node types the autoscaler can launch are not "
                           "known here; planning for the %g GPU(s) alive now",
                           current.total_gpus)
            return current
        raise
    logger.info("--autoscaling: planning for the node types the autoscaler can launch: %s",
                ", ".join(f"{t.name} (up to {t.max_workers} x {t.gpus:g} GPU"
                          + (f" of {t.gpu_memory_gb:g} GB" if t.gpu_memory_gb else "")
                          + f", {t.cpus:g} CPU)" for t in node_types) or "none")
    return launchable_shape(node_types)


def refuse_cpu_trials(gpus_by_trial: dict[str, float], shape: ClusterShape) -> None:
    """With `--autoscaling`, a plan that trains on the CPU while GPU nodes can be launched is
    a mistake (a 30-epoch run would take days on one torch thread), never a silent fallback."""
    on_cpu = [name for name, gpus in gpus_by_trial.items() if not gpus > 0]
    if on_cpu and shape.total_gpus > 0:
        raise ResourceError(
            f"--autoscaling: the plan puts {', '.join(on_cpu)} on the CPU while the autoscaler "
            f"can launch nodes with {shape.total_gpus:g} GPU(s); pass --gpus-per-trial with a "
            "GPU share (e.g. 1 or 0.5), or --gpus-per-trial 0 to train on the CPU on purpose")
