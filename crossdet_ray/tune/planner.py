"""The makespan planner: how many GPUs (or what share of one) each trial gets so that the last
trial ends as early as it can.

The headline job trains five backbones whose costs differ by about 5x; with the same share
each, the comparison lasts as long as mit_b5 alone while the GPUs of the small ones go idle.
The planner chooses per backbone either a share of one GPU (small backbones share a device) or
W whole GPUs with W data-parallel workers (large ones), within each GPU's memory, and predicts
every trial's hours by simulating how Ray would run the plan.

The cost model (all projected until a GPU measures it; see docs/scale.md):
- one trial's work is `steps x gpu_step_s` of the backbone registry, scaled by the global batch
  and the pixel count against the registry's batch 2 at 800 px;
- trials that share a GPU split its throughput in proportion to their shares (a trial alone on
  its GPU runs at full speed, whatever its share); a trial on W whole GPUs runs W x efficiency(W)
  times as fast, efficiency falling by DATA_PARALLEL_EFFICIENCY_PER_DOUBLING each doubling;
- Ray starts trials in start order, each as soon as its share fits on one GPU (W whole GPUs on
  one node), so trials that do not all fit at once queue.
- memory: weights, gradients and momentum (12 bytes a parameter) plus activations, which grow
  with the per-worker batch and the pixels and shrink with bf16 and activation checkpointing.

Nothing here imports Ray: the plan is made (and `--plan-only` answers) before Ray starts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from crossdet_ray.backbones import get_backbone
from crossdet_ray.tune.cluster import NodeType, PlanForError  # noqa: F401 (callers' error)
from crossdet_ray.tune.cluster import parse_plan_for as parse_node_types
from crossdet_ray.tune.resources import (
    DEFAULT_GPU_MEMORY_GB,
    TrialResources,
    gpu_memory_resource,
    round_cpu_share,
    shared_cpus,
    stated_gpu_memory_gb,
)

REGISTRY_BATCH = 2  # the registry's memory and step time are at batch 2 ...
REGISTRY_SIDE = 800  # ... of 800x1333 frames
BYTES_PER_PARAMETER_TRAINING = 12  # fp32 weights, gradients and SGD momentum
CUDA_RESERVED_GB = 1.0  # CUDA context, cuDNN/cuBLAS workspaces, allocator slack
BF16_ACTIVATION_FACTOR = 0.6  # autocast keeps most activations in bf16, some in fp32
CHECKPOINTED_ACTIVATION_FACTOR = 0.4  # encoder blocks recomputed; FPN and heads still stored
DATA_PARALLEL_EFFICIENCY_PER_DOUBLING = 0.9  # all-reduce and stragglers, NCCL on one node
SHARE_STEP = 0.05  # candidate GPU shares: multiples of this, and each backbone's minimum
CPU_REFERENCE_THREADS = 2  # the registry's CPU step times were measured with 2 threads


@dataclass(frozen=True)
class GpuNode:
    """One node the plan may use: its GPUs, each GPU's memory, and its CPUs."""

    gpus: int
    gpu_memory_gb: float
    cpus: float


@dataclass(frozen=True)
class Workload:
    """What the trials train: the same recipe for every backbone (the comparison stays fair)."""

    train_frames: int
    epochs: int
    batch_size: int
    min_size: int
    amp: str = "auto"  # as TrainConfig: auto = bf16 on CUDA
    activation_checkpointing: str = "auto"

    @property
    def steps(self) -> int:
        return self.epochs * max(1, math.ceil(self.train_frames / self.batch_size))

    @property
    def pixel_scale(self) -> float:
        return (self.min_size / REGISTRY_SIDE) ** 2


@dataclass(frozen=True)
class TrialRequest:
    """One trial to place: `trial` is its name (`mit_b0`, `mit_b0_lr0.0025`)."""

    trial: str
    backbone: str


@dataclass(frozen=True)
class Allocation:
    """A share of one GPU (`workers` 1, `gpus` <= 1) or `gpus` whole GPUs with as many workers."""

    gpus: float
    workers: int = 1

    @property
    def whole(self) -> bool:
        return self.workers > 1 or self.gpus >= 1


@dataclass
class PlannedTrial:
    trial: str
    backbone: str
    gpus: float
    workers: int
    cpus: float
    predicted_hours: float
    memory_gb_per_worker: float
    gpu_memory_gb: float | None = None  # the GPU size it is sent to (None: any)


@dataclass
class Plan:
    trials: list[PlannedTrial]
    predicted_makespan_hours: float
    lower_bound_hours: float
    one_gpu_each_hours: float | None
    cluster: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def for_trial(self, trial: str) -> PlannedTrial:
        return next(t for t in self.trials if t.trial == trial)

    def to_dict(self) -> dict[str, Any]:
        return {"trials": [asdict(t) for t in self.trials],
                "predicted_makespan_hours": self.predicted_makespan_hours,
                "lower_bound_hours": self.lower_bound_hours,
                "one_gpu_each_hours": self.one_gpu_each_hours,
                "cluster": self.cluster, "warnings": list(self.warnings)}


# -- the cost model ----------------------------------------------------------------------------
def data_parallel_efficiency(workers: int) -> float:
    return DATA_PARALLEL_EFFICIENCY_PER_DOUBLING ** math.log2(workers) if workers > 1 else 1.0


def gpu_hours_alone(backbone: str, workload: Workload) -> float:
    """Hours one trial takes alone on one GPU."""
    step = (get_backbone(backbone).gpu_step_s * workload.batch_size / REGISTRY_BATCH
            * workload.pixel_scale)
    return workload.steps * step / 3600


def cpu_hours(backbone: str, workload: Workload, cpus: float) -> float:
    """Hours on `cpus` cores, from the registry's 2-thread CPU step at min_size 320."""
    step = (get_backbone(backbone).cpu_step_s * workload.batch_size / REGISTRY_BATCH
            * (workload.min_size / 320) ** 2)
    return workload.steps * step / min(1.0, cpus / CPU_REFERENCE_THREADS) / 3600


def memory_gb(backbone: str, workload: Workload, per_worker_batch: int) -> float:
    """Peak GPU memory of one worker training `backbone` at `per_worker_batch` (projected)."""
    spec = get_backbone(backbone)
    fixed = spec.parameters * BYTES_PER_PARAMETER_TRAINING / 1e9
    activations = (spec.train_memory_gb - fixed) * per_worker_batch / REGISTRY_BATCH
    activations *= workload.pixel_scale
    if workload.amp in ("auto", "bf16"):
        activations *= BF16_ACTIVATION_FACTOR
    checkpointing = workload.activation_checkpointing
    if checkpointing == "on" or (checkpointing == "auto" and spec.checkpoint_on_cuda):
        activations *= CHECKPOINTED_ACTIVATION_FACTOR
    return fixed + activations + CUDA_RESERVED_GB


# -- simulating Ray running a plan -------------------------------------------------------------
@dataclass
class _Running:
    index: int
    allocation: Allocation
    gpus: list[tuple[int, int]]  # (node, gpu) it holds
    share: float


def simulate(requests: list[TrialRequest], allocations: list[Allocation],
             nodes: list[GpuNode], workload: Workload) -> list[float]:
    """Hours until each trial ends when Ray runs `allocations` in the given (start) order.

    Each trial runs only on the nodes of the GPU size it is routed to (`routed_gpu_memory_gb`).
    A trial with no GPU is not simulated here (its hours stay 0): the GPUs never wait for it.
    """
    sizes = gpu_sizes(nodes)
    routed = [routed_gpu_memory_gb(r.backbone, a, workload, sizes) if a.gpus > 0 else None
              for r, a in zip(requests, allocations)]
    work = [gpu_hours_alone(r.backbone, workload) for r in requests]
    used = {(n, g): 0.0 for n, node in enumerate(nodes) for g in range(node.gpus)}
    pending = [i for i, a in enumerate(allocations) if a.gpus > 0]
    running: list[_Running] = []
    finish = [math.inf if a.gpus > 0 else 0.0 for a in allocations]
    remaining = list(work)
    now = 0.0
    while pending or running:
        for index in list(pending):
            placed = _place(allocations[index], used, nodes, routed[index])
            if placed is not None:
                share = allocations[index].gpus if not allocations[index].whole else 1.0
                for gpu in placed:
                    used[gpu] += share
                running.append(_Running(index, allocations[index], placed, share))
                pending.remove(index)
        if not running:
            break  # what is left fits nowhere: its hours stay infinite
        rates = {}
        for item in running:
            if item.allocation.whole:
                rates[item.index] = item.allocation.workers * data_parallel_efficiency(
                    item.allocation.workers)
            else:
                gpu = item.gpus[0]
                sharing = sum(o.share for o in running if not o.allocation.whole and o.gpus[0] == gpu)
                rates[item.index] = item.share / sharing
        step = min(remaining[i] / rates[i] for i in rates)
        now += step
        for item in list(running):
            remaining[item.index] -= step * rates[item.index]
            if remaining[item.index] <= 1e-12:
                finish[item.index] = now
                for gpu in item.gpus:
                    used[gpu] -= item.share
                running.remove(item)
    return finish


def _place(allocation: Allocation, used: dict[tuple[int, int], float],
           nodes: list[GpuNode], gpu_memory_gb: float | None) -> list[tuple[int, int]] | None:
    def eligible(n: int) -> bool:
        return gpu_memory_gb is None or nodes[n].gpu_memory_gb == gpu_memory_gb

    if allocation.whole:
        wanted = max(1, allocation.workers, int(allocation.gpus))
        for n, node in enumerate(nodes):
            free = [(n, g) for g in range(node.gpus) if used[(n, g)] <= 1e-9]
            if eligible(n) and len(free) >= wanted:
                return free[:wanted]
        return None
    for gpu, taken in used.items():
        if eligible(gpu[0]) and taken + allocation.gpus <= 1 + 1e-9:
            return [gpu]
    return None


# -- which GPU size a trial goes to ----------------------------------------------------------
def gpu_sizes(nodes: Iterable[GpuNode]) -> list[float]:
    """The GPU memory sizes among the nodes, smallest first."""
    return sorted({n.gpu_memory_gb for n in nodes if n.gpus > 0})


def routed_gpu_memory_gb(backbone: str, allocation: Allocation, workload: Workload,
                         sizes: list[float]) -> float | None:
    """The GPU size a trial is sent to: the smallest whose share holds it (a share s of a GPU
    of M GB holds s x M), so that big GPUs stay free for the backbones only they hold; the
    largest where none does (the plan then warns). None with one size: any GPU will do."""
    if len(sizes) < 2:
        return None
    need = memory_gb(backbone, workload, workload.batch_size // allocation.workers)
    share = 1.0 if allocation.whole else allocation.gpus
    return next((size for size in sizes if need <= share * size + 1e-9), sizes[-1])


# -- choosing the plan -------------------------------------------------------------------------
def candidate_allocations(backbone: str, workload: Workload, gpu_memory_gb: float,
                          max_gpus_per_node: int) -> list[Allocation]:
    """Every allocation that fits memory: shares from the least that holds the trial up to a
    whole GPU, and W whole GPUs for each W that divides the global batch."""
    candidates = []
    need = memory_gb(backbone, workload, workload.batch_size)
    least = math.ceil(need / gpu_memory_gb / 0.01 - 1e-9) * 0.01
    if least <= 1:
        shares = {round(least, 2)} | {round(k * SHARE_STEP, 2)
                                      for k in range(1, int(1 / SHARE_STEP) + 1)
                                      if k * SHARE_STEP >= least - 1e-9}
        candidates += [Allocation(gpus=share) for share in sorted(shares)]
    for workers in range(2, max_gpus_per_node + 1):
        if workload.batch_size % workers:
            continue
        if memory_gb(backbone, workload, workload.batch_size // workers) <= gpu_memory_gb:
            candidates.append(Allocation(gpus=float(workers), workers=workers))
    return candidates


def _score(requests, allocations, nodes, workload) -> tuple[float, float]:
    finish = simulate(requests, allocations, nodes, workload)
    # The makespan first; then the GPU-hours held, so that of equal plans the leaner wins.
    held = sum(a.gpus * f for a, f in zip(allocations, finish))
    return max(finish), held


def plan_trials(requests: list[TrialRequest], nodes: list[GpuNode], workload: Workload,
                cpus_per_trial: float | None = None,
                fixed: dict[str, Allocation] | None = None,
                workers: dict[str, int] | None = None) -> Plan:
    """The plan with the smallest predicted makespan (or, with `fixed`, the prediction for the
    allocations the user chose per backbone; with `workers`, only allocations of that many
    workers per backbone). `requests` are in start order (longest first).

    Trials of one backbone (an LR grid) get the same allocation, so its trials stay comparable.
    """
    gpu_nodes = [n for n in nodes if n.gpus > 0]
    if not gpu_nodes or (fixed is not None and not any(a.gpus for a in fixed.values())):
        return _cpu_plan(requests, nodes, workload, cpus_per_trial)
    sizes = gpu_sizes(gpu_nodes)
    max_per_node = max(n.gpus for n in gpu_nodes)
    backbones = list(dict.fromkeys(r.backbone for r in requests))
    warnings = []
    options: dict[str, list[Allocation]] = {}
    for backbone in backbones:
        if fixed is not None:
            options[backbone] = [fixed[backbone]]
            continue
        # Shares are sized for the smallest GPU that holds the backbone whole (the largest if
        # none does): its trials go there (routed_gpu_memory_gb), leaving larger GPUs free.
        need = memory_gb(backbone, workload, workload.batch_size)
        gpu_memory = next((size for size in sizes if need <= size), sizes[-1])
        options[backbone] = [
            a for a in candidate_allocations(backbone, workload, gpu_memory, max_per_node)
            if workers is None or a.workers == workers.get(backbone, a.workers)]
        if not options[backbone]:
            warnings.append(
                f"{backbone} needs about {need:.0f} GB at batch {workload.batch_size} and "
                f"min_size {workload.min_size}, more than a {gpu_memory:.0f} GB GPU holds even "
                "split over workers: it gets a whole GPU but may run out of memory; lower "
                "--min-size, or raise --batch-size with more --workers-per-trial")
            options[backbone] = [Allocation(gpus=1.0)]

    def allocations_of(choice: dict[str, Allocation]) -> list[Allocation]:
        return [choice[r.backbone] for r in requests]

    scores: dict[tuple[Allocation, ...], tuple[float, float]] = {}

    def score(choice):
        key = tuple(choice[b] for b in backbones)
        if key not in scores:
            scores[key] = _score(requests, allocations_of(choice), gpu_nodes, workload)
        return scores[key]

    starts = [{b: options[b][0] for b in backbones},  # the least each needs
              {b: _nearest(options[b], 1.0) for b in backbones},  # one GPU each
              {b: options[b][-1] for b in backbones},  # the most each can use
              _balanced(requests, options, workload, sum(n.gpus for n in gpu_nodes))]
    best, best_score = None, (math.inf, math.inf)
    for choice in starts:
        current = score(choice)
        for _ in range(8):  # coordinate descent: one backbone's allocation at a time
            improved = False
            for backbone in backbones:
                for option in options[backbone]:
                    trial_choice = {**choice, backbone: option}
                    trial_score = score(trial_choice)
                    if trial_score < tuple(c - 1e-9 for c in current):
                        choice, current, improved = trial_choice, trial_score, True
            if not improved:
                break
        if best is None or current < best_score:
            best, best_score = choice, current
    allocations = allocations_of(best)
    cpus = cpus_per_trial or _shared_cpus(nodes, len(requests))
    finish = [f if a.gpus > 0 else cpu_hours(r.backbone, workload, cpus) for r, a, f in
              zip(requests, allocations, simulate(requests, allocations, gpu_nodes, workload))]
    one_each = simulate(requests, [_nearest(options[r.backbone], 1.0) if fixed is None
                                   else Allocation(gpus=1.0) for r in requests],
                        gpu_nodes, workload)
    total_gpus = sum(n.gpus for n in gpu_nodes)
    work = sum(gpu_hours_alone(r.backbone, workload) for r in requests)
    trials = [PlannedTrial(
        trial=r.trial, backbone=r.backbone, gpus=a.gpus, workers=a.workers,
        cpus=float(cpus), predicted_hours=_hours(f),
        memory_gb_per_worker=round(memory_gb(r.backbone, workload,
                                             workload.batch_size // a.workers), 1)
        if a.gpus > 0 else 0.0,
        gpu_memory_gb=routed_gpu_memory_gb(r.backbone, a, workload, sizes)
        if a.gpus > 0 else None)
        for r, a, f in zip(requests, allocations, finish)]
    return Plan(trials=trials, predicted_makespan_hours=_hours(max(finish)),
                lower_bound_hours=_hours(work / total_gpus),
                one_gpu_each_hours=_hours(max(one_each)),
                cluster=describe_nodes(nodes), warnings=warnings)


def assign_gpu_types(resources: dict[str, TrialResources], nodes: Iterable[dict[str, float]],
                     workload: Workload, cpus_per_trial: float,
                     cpus_given: bool) -> dict[str, TrialResources]:
    """Where each GPU trial runs and with how many CPUs, on the cluster's nodes (or node types).

    Where GPUs of several sizes are stated (`gpu_memory_<N>gb`), a trial asks for the resource
    of the size routed_gpu_memory_gb sends it to, so that Ray (and the autoscaler) places it
    only on a node whose GPU holds it. Unless --cpus-per-trial was given, a one-process GPU
    trial's CPUs are its GPU share of its node type's CPUs (at most `cpus_per_trial`): five
    trials at 0.2 GPU fit beside each other on their node.
    """
    gpu_nodes = [n for n in nodes if n.get("GPU", 0) > 0]
    if not gpu_nodes:
        return resources
    cpus_per_gpu: dict[float | None, float] = {}  # by GPU size (None: every GPU node)
    names: dict[float, str] = {}
    for node in gpu_nodes:
        share = node.get("CPU", 0) / node["GPU"]
        size = stated_gpu_memory_gb(node)
        for key in (size, None):
            cpus_per_gpu[key] = min(share, cpus_per_gpu.get(key, share))
        if size is not None:
            names[size] = gpu_memory_resource(node)
    # A GPU that states no memory cannot be asked for by it: then no trial is routed.
    routable = all(stated_gpu_memory_gb(n) is not None for n in gpu_nodes)
    sizes = sorted(names) if routable else []
    assigned = {}
    for backbone, wanted in resources.items():
        if not wanted.gpu > 0:
            assigned[backbone] = wanted
            continue
        size = routed_gpu_memory_gb(backbone, Allocation(gpus=wanted.gpu, workers=wanted.workers),
                                    workload, sizes)
        cpu = wanted.cpu
        if not cpus_given and not wanted.data_parallel:
            cpu = min(cpus_per_trial, round_cpu_share(wanted.gpu * cpus_per_gpu[size]))
        assigned[backbone] = TrialResources(
            cpu=cpu, gpu=wanted.gpu, workers=wanted.workers,
            gpu_memory_resource=names[size] if size is not None else None)
    return assigned


def _hours(hours: float) -> float:
    """To 0.001 h (3.6 s), or to 3 significant digits where that is finer, so that a short
    run's prediction is not rounded to zero."""
    return round(hours, 3) if hours >= 0.1 else float(f"{hours:.3g}")


def _balanced(requests, options, workload, total_gpus) -> dict[str, Allocation]:
    """The start that would end every trial together: for a target makespan M, each backbone
    takes the least allocation that finishes its trials within M on its own; the smallest M
    whose allocations add up to no more GPUs than there are (bisection on M)."""
    count = {}
    for r in requests:
        count[r.backbone] = count.get(r.backbone, 0) + 1
    alone = {b: gpu_hours_alone(b, workload) for b in options}

    def speed(a: Allocation) -> float:
        return a.workers * data_parallel_efficiency(a.workers) if a.whole else a.gpus

    def choose(target: float) -> dict[str, Allocation]:
        return {b: next((a for a in opts if alone[b] / speed(a) <= target), opts[-1])
                for b, opts in options.items()}

    low, high = 0.0, max(alone.values()) * len(requests) + 1.0
    for _ in range(40):
        middle = (low + high) / 2
        held = sum(a.gpus * count[b] for b, a in choose(middle).items())
        low, high = (low, middle) if held <= total_gpus + 1e-9 else (middle, high)
    return choose(high)


def _nearest(options: list[Allocation], gpus: float) -> Allocation:
    return min(options, key=lambda a: (abs(a.gpus - gpus), a.gpus))


def _shared_cpus(nodes: list[GpuNode], num_trials: int) -> float:
    """The command's default CPUs per trial (resources.shared_cpus) for these nodes."""
    return shared_cpus(sum(n.cpus for n in nodes), max((n.cpus for n in nodes), default=0),
                       num_trials)


def _cpu_plan(requests, nodes, workload, cpus_per_trial) -> Plan:
    total_cpus = sum(n.cpus for n in nodes)
    cpus = cpus_per_trial or _shared_cpus(nodes, len(requests))
    hours = [cpu_hours(r.backbone, workload, cpus) for r in requests]
    work = sum(cpu_hours(r.backbone, workload, CPU_REFERENCE_THREADS) for r in requests)
    trials = [PlannedTrial(trial=r.trial, backbone=r.backbone, gpus=0.0, workers=1,
                           cpus=float(cpus),
                           predicted_hours=_hours(h), memory_gb_per_worker=0.0)
              for r, h in zip(requests, hours)]
    return Plan(trials=trials, predicted_makespan_hours=_hours(max(hours, default=0)),
                lower_bound_hours=_hours(work / max(total_cpus / CPU_REFERENCE_THREADS, 1e-9)),
                one_gpu_each_hours=None, cluster=describe_nodes(nodes))


def describe_nodes(nodes: Iterable[GpuNode]) -> dict[str, Any]:
    nodes = list(nodes)
    return {"nodes": [asdict(n) for n in nodes], "gpus": sum(n.gpus for n in nodes),
            "cpus": sum(n.cpus for n in nodes)}


def gpu_nodes(node_types: Iterable[NodeType]) -> list[GpuNode]:
    """Node types (`--plan-for`, or what an autoscaler can launch) as the planner's nodes: each
    type at its most nodes."""
    return [GpuNode(gpus=int(t.gpus), gpu_memory_gb=t.gpu_memory_gb or DEFAULT_GPU_MEMORY_GB,
                    cpus=t.cpus) for t in node_types for _ in range(t.max_workers)]


def parse_plan_for(text: str) -> list[GpuNode]:
    """`8x80` = one node of 8 GPUs of 80 GB; `2x4x80` = two nodes of 4 such GPUs each."""
    return gpu_nodes(parse_node_types(text))


def format_plan(plan: Plan) -> str:
    """The plan as the command prints it before training."""
    cluster = plan.cluster
    sized = any(t.gpu_memory_gb for t in plan.trials)  # GPUs of several sizes: say which
    lines = [f"Plan for {cluster.get('gpus', 0):g} GPU(s), {cluster.get('cpus', 0):g} CPU(s) "
             f"(projected hours; see docs/scale.md):",
             f"  {'trial':<20} {'gpus':>6} {'workers':>7} {'cpus':>6} {'GB/worker':>9} "
             f"{'hours':>8}" + (f" {'on GPUs of':>10}" if sized else "")]
    for t in plan.trials:
        lines.append(f"  {t.trial:<20} {t.gpus:>6g} {t.workers:>7d} {t.cpus:>6g} "
                     f"{t.memory_gb_per_worker:>9.1f} {t.predicted_hours:>8.2f}"
                     + (f" {f'{t.gpu_memory_gb:g} GB' if t.gpu_memory_gb else 'any':>10}"
                        if sized else ""))
    lines.append(f"  predicted makespan {plan.predicted_makespan_hours:.2f} h; lower bound "
                 f"{plan.lower_bound_hours:.2f} h (all work / all GPUs)"
                 + (f"; one GPU per trial {plan.one_gpu_each_hours:.2f} h"
                    if plan.one_gpu_each_hours is not None else ""))
    lines += [f"  WARNING: {w}" for w in plan.warnings]
    return "\n".join(lines)

