"""How much of the cluster each trial gets, and whether the cluster can ever give it.

`--gpus-per-trial` is a number (fractions share a GPU: 0.2 puts five trials on one), a
per-backbone list (`mit_b4=1,mit_b5=1,default=0.5`) or `auto`. Ray enforces the shares: a
trial starts only when its share is free, so fractions decide how many run at once per GPU.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

from crossdet_ray.backbones import BACKBONE_REGISTRY

logger = logging.getLogger(__name__)

# Peak training memory per backbone at batch 2, 800x1333, fp32 (the registry's projection from
# benchmarks/memory.py; docs/scale.md). Used only to pack trials with `--gpus-per-trial auto`.
GPU_MEMORY_NEED_GB: dict[str, float] = {
    name: spec.train_memory_gb for name, spec in BACKBONE_REGISTRY.items()}
DEFAULT_GPU_MEMORY_GB = 80.0  # an A100/H100 80 GB, what the reference was run on
# A node's custom resource that states its GPUs' memory, e.g. {"gpu_memory_24gb": 1} in
# cluster.yaml: the head that plans the trials often has no GPU to ask.
GPU_MEMORY_RESOURCE = re.compile(r"^gpu_memory_(\d+(?:\.\d+)?)gb$")


class ResourceError(ValueError):
    """A resource request that is malformed or that the cluster can never satisfy."""


@dataclass(frozen=True)
class TrialResources:
    cpu: float
    gpu: float

    def as_bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.cpu}
        if self.gpu:
            bundle["GPU"] = self.gpu
        return bundle


@dataclass(frozen=True)
class GpuRequest:
    """A parsed `--gpus-per-trial`: `auto`, or explicit shares with a default."""

    auto: bool
    per_backbone: dict[str, float]
    default: float | None

    def share_for(self, backbone: str) -> float | None:
        return self.per_backbone.get(backbone, self.default)


def _parse_share(text: str, flag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ResourceError(f"{flag}: '{text}' is not a number; pass e.g. 1, 0.5 or auto") from None
    if not math.isfinite(value) or value < 0:
        raise ResourceError(f"{flag}: {text} must be a number >= 0")
    if value > 1 and not value.is_integer():
        # Ray only shares GPUs below one; above one it needs whole GPUs.
        raise ResourceError(f"{flag}: {text} is more than one GPU but not a whole number; "
                            "pass a fraction below 1 or a whole number of GPUs")
    return value


def parse_gpus_per_trial(text: str, backbones: list[str]) -> GpuRequest:
    flag = "--gpus-per-trial"
    text = text.strip()
    if text == "auto":
        return GpuRequest(auto=True, per_backbone={}, default=None)
    if "=" not in text:
        return GpuRequest(auto=False, per_backbone={}, default=_parse_share(text, flag))
    per_backbone: dict[str, float] = {}
    default = None
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ResourceError(f"{flag}: '{item}' is not NAME=SHARE; pass e.g. "
                                "mit_b4=1,mit_b5=1,default=0.5")
        if name == "default":
            default = _parse_share(value.strip(), flag)
        else:
            per_backbone[name] = _parse_share(value.strip(), flag)
    unknown = sorted(set(per_backbone) - set(BACKBONE_REGISTRY))
    if unknown:
        raise ResourceError(f"{flag}: unknown backbone {', '.join(unknown)}; "
                            f"known: {', '.join(BACKBONE_REGISTRY)}")
    missing = [b for b in backbones if b not in per_backbone and default is None]
    if missing:
        raise ResourceError(f"{flag}: no share for {', '.join(missing)}; add default=SHARE")
    return GpuRequest(auto=False, per_backbone=per_backbone, default=default)


@dataclass(frozen=True)
class ClusterShape:
    """What the cluster has: totals, and each alive node's own totals."""

    total_cpus: float
    total_gpus: float
    nodes: tuple[dict[str, float], ...]  # per node {"CPU": n, "GPU": n}
    gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB


def cluster_gpu_memory_gb(node_resources: list[dict[str, float]],
                          local_gpu_memory_gb: float | None) -> float:
    """The GPU memory `auto` packs trials for: the smallest GPU among the nodes that have one.

    A GPU node states its memory with a `gpu_memory_<N>gb` resource; one that does not is taken
    to have the local GPU's memory (if the planner has a GPU) or DEFAULT_GPU_MEMORY_GB.
    """
    unstated = local_gpu_memory_gb or DEFAULT_GPU_MEMORY_GB
    sizes = []
    for resources in node_resources:
        if resources.get("GPU", 0) <= 0:
            continue
        stated = [float(match.group(1)) for key in resources
                  if (match := GPU_MEMORY_RESOURCE.match(key))]
        sizes.append(min(stated) if stated else unstated)
    return min(sizes) if sizes else unstated


def _floor(value: float, step: float = 0.01) -> float:
    return math.floor(value / step + 1e-9) * step


def plan_resources(
    request: GpuRequest,
    backbones: list[str],
    num_trials_per_backbone: int,
    cluster: ClusterShape,
    cpus_per_trial: float | None,
) -> dict[str, TrialResources]:
    """Each backbone's share of CPUs and GPUs (trials of one backbone in an LR grid share it)."""
    num_trials = len(backbones) * num_trials_per_backbone
    if cpus_per_trial is None:
        # Share the cluster's CPUs out, never below a tenth of one: Ray then queues trials.
        cpus_per_trial = max(0.1, _floor(cluster.total_cpus / max(num_trials, 1)))
        if cpus_per_trial >= 1:
            cpus_per_trial = math.floor(cpus_per_trial)
    elif cpus_per_trial <= 0:
        raise ResourceError("--cpus-per-trial must be > 0")

    plan = {}
    for backbone in backbones:
        if request.auto:
            if cluster.total_gpus <= 0:
                gpu = 0.0
            elif cluster.total_gpus >= num_trials:
                gpu = 1.0
            else:
                need = GPU_MEMORY_NEED_GB.get(backbone, cluster.gpu_memory_gb)
                gpu = min(1.0, max(0.01, _floor(need / cluster.gpu_memory_gb)))
                if need > cluster.gpu_memory_gb:
                    logger.warning(
                        "%s needs about %.0f GB at 800 px in fp32 and the smallest GPU has "
                        "%.0f GB: it gets a whole GPU but may run out of memory; lower "
                        "--min-size, or keep --amp and --activation-checkpointing at auto",
                        backbone, need, cluster.gpu_memory_gb)
        else:
            gpu = request.share_for(backbone)
        plan[backbone] = TrialResources(cpu=float(cpus_per_trial), gpu=float(gpu))
    return plan


def check_feasible(plan: dict[str, TrialResources], cluster: ClusterShape,
                   autoscaling: bool = False) -> None:
    """Fail now, with a message, for a trial no node of the cluster can ever hold.

    With an autoscaling cluster, nodes that do not exist yet may satisfy it, so only an
    impossible value (not the current nodes) is an error there.
    """
    if autoscaling:
        return
    for backbone, wanted in plan.items():
        fits = any(node.get("CPU", 0) >= wanted.cpu - 1e-9 and node.get("GPU", 0) >= wanted.gpu - 1e-9
                   for node in cluster.nodes)
        if fits:
            continue
        if wanted.gpu > 0 and cluster.total_gpus <= 0:
            raise ResourceError(
                f"{backbone} asks for {wanted.gpu:g} GPU per trial but the cluster has no GPU; "
                "pass --gpus-per-trial 0 (or auto) to train on the CPU, or join a cluster with "
                "GPUs via --address")
        largest_gpu = max((n.get("GPU", 0) for n in cluster.nodes), default=0)
        largest_cpu = max((n.get("CPU", 0) for n in cluster.nodes), default=0)
        raise ResourceError(
            f"{backbone} asks for {wanted.gpu:g} GPU and {wanted.cpu:g} CPU per trial, but the "
            f"largest node has {largest_gpu:g} GPU and {largest_cpu:g} CPU; lower "
            "--gpus-per-trial / --cpus-per-trial")


def torch_threads_for(cpus: float) -> int:
    """Threads a trial gives torch: what it was granted, at least one."""
    return max(1, int(cpus))
