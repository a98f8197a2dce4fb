"""How much of the cluster each trial gets, and whether the cluster can ever give it.

`--gpus-per-trial` is a number (fractions share a GPU: 0.2 puts five trials on one), a
per-backbone list (`mit_b4=1,mit_b5=1,default=0.5`) or `auto`. Ray enforces the shares: a
trial starts only when its share is free, so fractions decide how many run at once per GPU.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from crossdet_ray.backbones import BACKBONE_REGISTRY

DEFAULT_GPU_MEMORY_GB = 80.0  # an A100/H100 80 GB, what the reference was run on
# A node's custom resource that states its GPUs' memory, e.g. {"gpu_memory_24gb": 1} in
# cluster.yaml: the head that plans the trials often has no GPU to ask.
GPU_MEMORY_RESOURCE = re.compile(r"^gpu_memory_(\d+(?:\.\d+)?)gb$")


class ResourceError(ValueError):
    """A resource request that is malformed or that the cluster can never satisfy."""


# A data-parallel trial's own process only launches its workers, which do the training.
DATA_PARALLEL_DRIVER_CPU = 0.1
# What a trial holds of its node type's `gpu_memory_<N>gb` resource: a token amount that only
# picks the node type (its GPUs, not this, limit how many trials share a node).
GPU_MEMORY_MARKER = 0.001


@dataclass(frozen=True)
class TrialResources:
    """One trial's share: `cpu` and `gpu` in all, over `workers` data-parallel processes."""

    cpu: float
    gpu: float
    workers: int = 1
    # The `gpu_memory_<N>gb` resource of the node type whose GPUs hold this trial (None: any).
    gpu_memory_resource: str | None = None

    @property
    def data_parallel(self) -> bool:
        return self.workers > 1

    def to_dict(self) -> dict[str, float | int | str]:
        """As run_config.json, training_info.json and the summary record it (the GPU size only
        where the trial is sent to one)."""
        values = {"cpu": self.cpu, "gpu": self.gpu, "workers": self.workers}
        if self.gpu_memory_resource:
            values["gpu_memory_resource"] = self.gpu_memory_resource
        return values

    def as_bundle(self) -> dict[str, float]:
        """What the trial's own process holds (a data-parallel trial's workers hold the rest)."""
        if self.data_parallel:
            return {"CPU": DATA_PARALLEL_DRIVER_CPU}
        bundle = {"CPU": self.cpu}
        if self.gpu:
            bundle["GPU"] = self.gpu
            bundle.update(self._gpu_memory_marker())
        return bundle

    @property
    def gpu_memory_gb(self) -> float | None:
        """The GB per GPU of the node type it is sent to (None: any)."""
        return stated_gpu_memory_gb(self._gpu_memory_marker())

    def _gpu_memory_marker(self) -> dict[str, float]:
        return {self.gpu_memory_resource: GPU_MEMORY_MARKER} if self.gpu_memory_resource else {}

    @property
    def worker_cpu(self) -> float:
        if not self.data_parallel:
            return self.cpu
        return _floor((self.cpu - DATA_PARALLEL_DRIVER_CPU) / self.workers)

    def worker_bundle(self) -> dict[str, float]:
        """Each data-parallel worker's: its CPUs and one whole GPU (none on a CPU trial)."""
        bundle = {"CPU": self.worker_cpu}
        if self.gpu:
            bundle["GPU"] = 1.0
            bundle.update(self._gpu_memory_marker())
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


def _parse_workers(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ResourceError(f"{flag}: '{text}' is not a whole number; pass e.g. 1, 2 or "
                            "auto") from None
    if value < 1:
        raise ResourceError(f"{flag}: {text} must be at least 1")
    return value


def parse_gpus_per_trial(text: str, backbones: list[str]) -> GpuRequest:
    return _parse_request(text, backbones, "--gpus-per-trial", _parse_share,
                          "mit_b4=1,mit_b5=1,default=0.5")


def parse_workers_per_trial(text: str, backbones: list[str]) -> GpuRequest:
    """`--workers-per-trial`: the same forms as `--gpus-per-trial`, in whole workers."""
    return _parse_request(text, backbones, "--workers-per-trial", _parse_workers,
                          "mit_b5=4,default=1")


def _parse_request(text: str, backbones: list[str], flag: str, parse_value,
                   example: str) -> GpuRequest:
    text = text.strip()
    if text == "auto":
        return GpuRequest(auto=True, per_backbone={}, default=None)
    if "=" not in text:
        return GpuRequest(auto=False, per_backbone={}, default=parse_value(text, flag))
    per_backbone: dict[str, float] = {}
    default = None
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ResourceError(f"{flag}: '{item}' is not NAME=VALUE; pass e.g. {example}")
        if name == "default":
            default = parse_value(value.strip(), flag)
        else:
            per_backbone[name] = parse_value(value.strip(), flag)
    unknown = sorted(set(per_backbone) - set(BACKBONE_REGISTRY))
    if unknown:
        raise ResourceError(f"{flag}: unknown backbone {', '.join(unknown)}; "
                            f"known: {', '.join(BACKBONE_REGISTRY)}")
    missing = [b for b in backbones if b not in per_backbone and default is None]
    if missing:
        raise ResourceError(f"{flag}: no value for {', '.join(missing)}; add default=VALUE")
    return GpuRequest(auto=False, per_backbone=per_backbone, default=default)


@dataclass(frozen=True)
class ClusterShape:
    """What the cluster has: totals, and each alive node's own totals."""

    total_cpus: float
    total_gpus: float
    # per node {"CPU": n, "GPU": n}, and its `gpu_memory_<N>gb` resource where it states one
    nodes: tuple[dict[str, float], ...]
    gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB


def cluster_gpu_memory_gb(node_resources: list[dict[str, float]],
                          local_gpu_memory_gb: float | None) -> float:
    """The GPU memory `auto` packs trials for: the smallest GPU among the nodes that have one.

    A GPU node states its memory with a `gpu_memory_<N>gb` resource; one that does not is taken
    to have the local GPU's memory (if the planner has a GPU) or DEFAULT_GPU_MEMORY_GB.
    """
    unstated = local_gpu_memory_gb or DEFAULT_GPU_MEMORY_GB
    sizes = [stated_gpu_memory_gb(resources) or unstated for resources in node_resources
             if resources.get("GPU", 0) > 0]
    return min(sizes) if sizes else unstated


def stated_gpu_memory_gb(resources: dict[str, float]) -> float | None:
    """The GB per GPU a node (type) states with `gpu_memory_<N>gb` (the smallest if several)."""
    key = gpu_memory_resource(resources)
    return float(GPU_MEMORY_RESOURCE.match(key).group(1)) if key else None


def gpu_memory_resource(resources: dict[str, float]) -> str | None:
    """The `gpu_memory_<N>gb` key of a node's (type's) resources (the smallest N if several)."""
    stated = [(float(match.group(1)), key) for key in resources
              if (match := GPU_MEMORY_RESOURCE.match(key))]
    return min(stated)[1] if stated else None


def node_totals(resources: dict[str, float]) -> dict[str, float]:
    """What the plan needs of a node's resources: CPUs, GPUs and its GPU memory resource."""
    totals = {"CPU": float(resources.get("CPU", 0)), "GPU": float(resources.get("GPU", 0))}
    key = gpu_memory_resource(resources)
    if key and totals["GPU"] > 0:
        totals[key] = float(resources[key])
    return totals


def bundle_fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    """Whether a node's resources (its totals) can ever hold a bundle."""
    return all(node.get(key, 0.0) >= amount - 1e-9 for key, amount in bundle.items())


def _floor(value: float, step: float = 0.01) -> float:
    return math.floor(value / step + 1e-9) * step


def shared_cpus(total_cpus: float, largest_node_cpus: float, num_trials: int) -> float:
    """Each trial's CPUs when `--cpus-per-trial` is not given: the cluster's shared out, never
    below a tenth of one (Ray then queues trials), never above one node's (a trial runs on
    one node, so no trial could get more), whole CPUs from one up."""
    return round_cpu_share(min(total_cpus / max(num_trials, 1), largest_node_cpus))


def round_cpu_share(cpus: float) -> float:
    """A share of CPUs as trials get them: never below a tenth, whole CPUs from one up."""
    cpus = max(0.1, _floor(cpus))
    return float(math.floor(cpus)) if cpus >= 1 else cpus


def cluster_cpus_per_trial(cluster: ClusterShape, num_trials: int) -> float:
    """The CPUs each of `num_trials` trials gets of the cluster without --cpus-per-trial."""
    largest_node = max((n.get("CPU", 0) for n in cluster.nodes), default=cluster.total_cpus)
    return shared_cpus(cluster.total_cpus, largest_node, num_trials)


def plan_resources(
    request: GpuRequest,
    backbones: list[str],
    num_trials_per_backbone: int,
    cluster: ClusterShape,
    cpus_per_trial: float | None,
) -> dict[str, TrialResources]:
    """Each backbone's share of CPUs and its `--gpus-per-trial` GPUs (trials of one backbone in
    an LR grid share it); `auto` GPUs are chosen by the planner (launcher.plan_run)."""
    num_trials = len(backbones) * num_trials_per_backbone
    given_cpus = cpus_per_trial
    if cpus_per_trial is None:
        cpus_per_trial = cluster_cpus_per_trial(cluster, num_trials)
    elif cpus_per_trial <= 0:
        raise ResourceError("--cpus-per-trial must be > 0")

    # A GPU trial's CPUs, unless given, are at most its share of its node's: trials that share
    # a GPU must also fit beside each other on the GPU's node (the least CPU-rich GPU node).
    per_gpu = min((n.get("CPU", 0) / n["GPU"] for n in cluster.nodes if n.get("GPU", 0) > 0),
                  default=None)
    plan = {}
    for backbone in backbones:
        # `auto` on a cluster with GPUs is the makespan planner's (tune/planner.py) to decide;
        # here it stands for the CPU, which is what it means without GPUs.
        gpu = 0.0 if request.auto else request.share_for(backbone)
        cpu = float(cpus_per_trial)
        if given_cpus is None and gpu > 0 and per_gpu:
            cpu = min(cpu, round_cpu_share(gpu * per_gpu))
        plan[backbone] = TrialResources(cpu=cpu, gpu=float(gpu))
    return plan


def check_batch_split(backbone: str, batch_size: int, workers: int) -> None:
    """Each of a trial's data-parallel workers takes an equal share of the global batch."""
    if batch_size % workers:
        raise ResourceError(
            f"{backbone}: --batch-size {batch_size} is not divisible by --workers-per-trial "
            f"{workers}: each worker takes an equal share of the global batch; pass a "
            f"--batch-size that is a multiple of {workers}")


def assign_workers(plan: dict[str, TrialResources], request: GpuRequest,
                   batch_size: int) -> dict[str, TrialResources]:
    """Each backbone's data-parallel workers (`--workers-per-trial`), checked against its GPUs
    and the global batch: a worker trains on one whole GPU (NCCL cannot share a device between
    ranks) and takes batch / workers images of each step."""
    assigned = {}
    for backbone, share in plan.items():
        whole_gpus = int(share.gpu) if share.gpu >= 1 else 0
        workers = (whole_gpus or 1) if request.auto else int(request.share_for(backbone))
        if workers > 1 and 0 < share.gpu < 1:
            raise ResourceError(
                f"{backbone}: --workers-per-trial {workers} with --gpus-per-trial {share.gpu:g}: "
                "data-parallel workers each need one whole GPU (NCCL cannot share a device "
                f"between ranks); give {backbone} {workers} GPUs, or 1 worker")
        if whole_gpus and workers != whole_gpus:
            raise ResourceError(
                f"{backbone}: --gpus-per-trial {whole_gpus} with --workers-per-trial {workers}: "
                "each worker trains on one whole GPU, so a trial with "
                f"{whole_gpus} GPUs needs {whole_gpus} workers; pass equal numbers, or leave "
                "--workers-per-trial at auto")
        check_batch_split(backbone, batch_size, workers)
        resources = TrialResources(cpu=share.cpu, gpu=share.gpu, workers=workers)
        if resources.data_parallel and resources.worker_cpu < 0.1:
            raise ResourceError(
                f"{backbone}: {share.cpu:g} CPUs cannot be split over {workers} workers (and "
                "the trial's own process); raise --cpus-per-trial to at least "
                f"{DATA_PARALLEL_DRIVER_CPU + 0.1 * workers:g}")
        assigned[backbone] = resources
    return assigned


def check_feasible(plan: dict[str, TrialResources], cluster: ClusterShape,
                   autoscaling: bool = False) -> None:
    """Fail now, with a message, for a trial no node of the cluster can ever hold.

    With an autoscaling cluster, nodes that do not exist yet may satisfy it, so only an
    impossible value (not the current nodes) is an error there.
    """
    if autoscaling:
        return
    for backbone, wanted in plan.items():
        if wanted.data_parallel:
            _check_workers_fit(backbone, wanted, cluster)
            continue
        if any(bundle_fits(wanted.as_bundle(), node) for node in cluster.nodes):
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


def _check_workers_fit(backbone: str, wanted: TrialResources, cluster: ClusterShape) -> None:
    """A data-parallel trial's workers may spread over nodes; each needs one node to fit it."""
    worker = wanted.worker_bundle()
    slots = sum(min(int(node.get("CPU", 0) / worker["CPU"] + 1e-9),
                    int(node.get("GPU", 0) / worker["GPU"] + 1e-9) if "GPU" in worker else 10**9)
                for node in cluster.nodes
                if not wanted.gpu_memory_resource or wanted.gpu_memory_resource in node)
    if slots >= wanted.workers:
        return
    what = f"{worker['CPU']:g} CPU" + (" and 1 GPU" if "GPU" in worker else "")
    raise ResourceError(
        f"{backbone} asks for {wanted.workers} workers of {what} each, but the cluster holds "
        f"only {slots} such workers; lower --workers-per-trial or --cpus-per-trial, or add "
        "nodes")


def torch_threads_for(cpus: float) -> int:
    """Threads a trial gives torch: what it was granted, at least one."""
    return max(1, int(cpus))
