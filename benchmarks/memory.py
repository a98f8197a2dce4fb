"""Peak training memory per backbone (batch 2), measured for one training step.

    python benchmarks/memory.py --min-size 320

On a GPU it reads torch.cuda.max_memory_allocated; on a CPU the peak resident set size of a
fresh process per backbone (an upper bound of the same tensors). Each backbone runs in its own
subprocess so peaks do not mix. Prints a table and writes benchmarks/results/memory.json,
including a projection to other sizes (activations scale with the pixel count).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

from tabulate import tabulate

from crossdet_ray.backbones import BACKBONE_NAMES


def measure(backbone: str, min_size: int, max_size: int, batch: int) -> dict:
    import torch

    from crossdet_ray.engine.train import select_device
    from crossdet_ray.models import build_detector

    device = select_device("auto")
    torch.manual_seed(0)
    model = build_detector(backbone, num_classes=2, min_size=min_size, max_size=max_size).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9, weight_decay=5e-4)
    images = [torch.rand(5, 480, 640, device=device) for _ in range(batch)]
    targets = [{"boxes": torch.tensor([[50.0, 60.0, 200.0, 220.0]], device=device),
                "labels": torch.tensor([1], device=device)} for _ in range(batch)]

    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def step():
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # the first step allocates gradients and momentum buffers
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        static = torch.cuda.memory_allocated() / 2**20
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        static = rss_mb()
        step()
        peak = rss_mb()
    params = sum(p.numel() for p in model.parameters())
    return {"backbone": backbone, "device": str(device), "params": params,
            "weights_grads_momentum_mb": params * 4 * 3 / 2**20, "peak_mb": peak,
            "after_first_step_mb": static}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONE_NAMES))
    parser.add_argument("--min-size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--project-to", type=int, nargs="+", default=[800])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--output", default="benchmarks/results/memory.json")
    args = parser.parse_args()
    max_size = int(args.min_size * 1333 / 800)
    if args.one:
        print(json.dumps(measure(args.one, args.min_size, max_size, args.batch)))
        return

    results = []
    for backbone in args.backbones:
        out = subprocess.run([sys.executable, __file__, "--one", backbone, "--min-size",
                              str(args.min_size), "--batch", str(args.batch)],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for r in results:
        activations = max(r["peak_mb"] - r["weights_grads_momentum_mb"], 0.0)
        r["activations_mb"] = activations
        r["projected_peak_gb"] = {
            str(size): (r["weights_grads_momentum_mb"] + activations * (size / args.min_size) ** 2)
            / 1024 for size in args.project_to}
        rows.append([r["backbone"], f"{r['params'] / 1e6:.1f}M", f"{r['peak_mb'] / 1024:.2f}",
                     f"{activations / 1024:.2f}"]
                    + [f"{r['projected_peak_gb'][str(s)]:.1f}" for s in args.project_to])
    print(tabulate(rows, headers=["backbone", "params", f"peak GB @{args.min_size}",
                                  "activations GB"] + [f"projected GB @{s}" for s in args.project_to],
                   tablefmt="github"))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"args": vars(args), "platform": platform.platform(),
                                             "results": results}, indent=2))


if __name__ == "__main__":
    main()
