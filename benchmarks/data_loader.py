"""Goal 4: the data loader delivers at least 10x the images/s that mit_b0 trains at.

    python benchmarks/data_loader.py --images 32 --workers 0 2

Loads the built-in synthetic set (real frame sizes) through NpyYoloDataset and the same
DataLoader settings training uses, and compares with mit_b0's training images/s from
benchmarks/results/epoch_time.json (run benchmarks/epoch_time.py first) or --train-ips.
Prints a table and writes benchmarks/results/data_loader.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tabulate import tabulate
from torch.utils.data import DataLoader

from crossdet_ray.data import NpyYoloDataset, collate_detection
from crossdet_ray.data.resolve import ensure_dataset, synthetic_spec


def loader_images_per_sec(data_dir: str, workers: int, batch: int, passes: int) -> float:
    dataset = NpyYoloDataset(data_dir, split="all")
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                        collate_fn=collate_detection)
    next(iter(loader))  # worker start-up is paid once per epoch, like training
    start = time.perf_counter()
    images = 0
    for _ in range(passes):
        for batch_images, _ in loader:
            images += len(batch_images)
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--train-ips", type=float, default=None,
                        help="mit_b0 training images/s (default: from epoch_time.json)")
    parser.add_argument("--output", default="benchmarks/results/data_loader.json")
    args = parser.parse_args()

    train_ips = args.train_ips
    if train_ips is None:
        recorded = json.loads(Path("benchmarks/results/epoch_time.json").read_text())
        train_ips = recorded["results"]["mit_b0"]["train_images_per_sec"]
    data_dir = ensure_dataset(synthetic_spec(args.images, 0))
    rows, results = [], {}
    for workers in args.workers:
        ips = loader_images_per_sec(data_dir, workers, args.batch, args.passes)
        results[workers] = ips
        rows.append((workers, f"{ips:.1f}", f"{ips / train_ips:.0f}x"))
    print(tabulate(rows, headers=("num_workers", "loader images/s",
                                  f"vs mit_b0 training ({train_ips:.2f} img/s)"),
                   tablefmt="github"))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"args": vars(args), "mit_b0_train_ips": train_ips,
                                             "loader_ips_by_workers": results}, indent=2))


if __name__ == "__main__":
    main()
