"""Goal 1: training images/s on the CPU, optimised vs a plain eager fp32 baseline.

    python benchmarks/cpu_throughput.py --backbones mit_b0 mit_b5 --steps 4 [--profile]
        [--compile {dynamic,static}]

Batch 2 of 5 x 240 x 320 frames, min_size 320 (FACTS.md's CPU setting). The baseline turns
every optimisation switch off (`fused_attention=False`: attention as explicit softmax(QK^T)V;
`vectorized_roi_align=False`: torchvision's RoIAlign kernel; `build_optimizer(fused=False)`:
SGD's per-tensor loop); the optimised model is the default build with the engine's optimizer.
Both start from the same weights; the FPN features must agree within 1e-4 relative. Their
steps alternate, so both see the same machine.
Prints a table and writes benchmarks/results/cpu_throughput.json.
"""

from __future__ import annotations

import argparse
import time

import torch
from tabulate import tabulate

from common import write_results
from crossdet_ray.config import BACKBONES, TrainConfig
from crossdet_ray.engine.train import build_optimizer, compile_encoder
from crossdet_ray.models import build_detector

VARIANTS = {"eager baseline": {"fused_attention": False, "vectorized_roi_align": False},
            "optimised (default)": {}}
FUSED_OPTIMIZER = {"eager baseline": False, "optimised (default)": True}


def batch(seed: int = 0, count: int = 2):
    generator = torch.Generator().manual_seed(seed)
    images = [torch.rand(5, 240, 320, generator=generator) for _ in range(count)]
    targets = [{"boxes": torch.tensor([[30.0, 40.0, 120.0, 150.0], [200.0, 60.0, 260.0, 140.0]]),
                "labels": torch.tensor([1, 1])} for _ in range(count)]
    return images, targets


def sgd(model: torch.nn.Module, fused: bool = True) -> torch.optim.Optimizer:
    """The engine's optimizer (the reference's SGD settings)."""
    return build_optimizer(TrainConfig(), model, fused=fused)[0]


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images, targets) -> None:
    loss = sum(model(images, targets).values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


WARM_UP_STEPS = 2  # the first two steps fault in fresh memory (momentum, grads): 2-6 s of sys


def median_step_seconds(models: dict[str, torch.nn.Module], steps: int) -> dict[str, float]:
    """Training steps of the variants taken in turn (A B A B ...), so drift in the machine's
    speed hits each alike; the median step of each after the warm-up steps."""
    optimizers = {name: sgd(model, FUSED_OPTIMIZER[name]) for name, model in models.items()}
    images, targets = batch()
    times: dict[str, list[float]] = {name: [] for name in models}
    for index in range(WARM_UP_STEPS + steps):
        for name, model in models.items():
            start = time.perf_counter()
            train_step(model, optimizers[name], images, targets)
            if index >= WARM_UP_STEPS:
                times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def profile_step(model: torch.nn.Module, fused_optimizer: bool, top: int = 10) -> list[dict]:
    """The ops that took the most self CPU time in one training step."""
    from torch.profiler import ProfilerActivity, profile

    optimizer = sgd(model, fused_optimizer)
    images, targets = batch()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        train_step(model, optimizer, images, targets)
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "share": e.self_cpu_time_total / total} for e in events[:top]]


def max_relative_difference(a: dict, b: dict) -> float:
    return max(float(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)))
               for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--profile", action="store_true",
                        help="also print where one step's CPU time goes, per variant")
    parser.add_argument("--compile", choices=("dynamic", "static"),
                        help="also torch.compile the optimised model's encoder, for dynamic "
                             "shapes (as --compile does on CUDA) or for this one frame size; "
                             "the warm-up steps then include compiling")
    parser.add_argument("--output", default="benchmarks/results/cpu_throughput.json")
    args = parser.parse_args()

    rows, results = [], {}
    for backbone in args.backbones:
        torch.manual_seed(0)
        reference = build_detector(backbone, num_classes=2, min_size=320, max_size=533)
        state = reference.state_dict()
        del reference
        models, features = {}, {}
        for name, switches in VARIANTS.items():
            model = build_detector(backbone, num_classes=2, min_size=320, max_size=533, **switches)
            model.load_state_dict(state)
            model.eval()
            with torch.no_grad():
                frames = torch.stack(batch()[0])
                features[name] = model.backbone(model.transform(list(frames))[0].tensors)
            models[name] = model.train()
        if args.compile:
            compile_encoder(models["optimised (default)"], dynamic=args.compile == "dynamic")
        timings = median_step_seconds(models, args.steps)
        profiles = {name: profile_step(model, FUSED_OPTIMIZER[name])
                    for name, model in models.items()} \
            if args.profile else {}
        for name, ops in profiles.items():
            print(f"\n{backbone}, {name}: top ops by self CPU time")
            print(tabulate([(o["op"][:60], f"{o['self_cpu_ms']:.0f}", f"{100 * o['share']:.1f}%")
                            for o in ops], headers=("op", "ms", "share"), tablefmt="github"))
        del models
        baseline, optimised = timings["eager baseline"], timings["optimised (default)"]
        difference = max_relative_difference(features["optimised (default)"],
                                             features["eager baseline"])
        results[backbone] = {"baseline_step_sec": baseline, "optimised_step_sec": optimised,
                             "baseline_images_per_sec": 2 / baseline,
                             "optimised_images_per_sec": 2 / optimised,
                             "speedup": baseline / optimised, "fpn_max_rel_diff": difference,
                             "profiles": profiles}
        rows.append((backbone, f"{2 / baseline:.2f}", f"{2 / optimised:.2f}",
                     f"{baseline / optimised:.2f}x", f"{difference:.1e}"))
    print(tabulate(rows, headers=("backbone", "baseline img/s", "optimised img/s", "speed-up",
                                  "FPN max rel diff"), tablefmt="github"))
    write_results(args, results=results)


if __name__ == "__main__":
    main()
