"""One training epoch per backbone on the built-in synthetic data, on this machine's CPU/GPU.

    python benchmarks/epoch_time.py --backbones mit_b0 mit_b5 --images 32 --min-size 320

Prints a table and writes benchmarks/results/epoch_time.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch
from tabulate import tabulate

from crossdet_ray.config import TrainConfig
from crossdet_ray.engine.train import fit, select_device
from crossdet_ray.data.resolve import ensure_dataset, synthetic_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbones", nargs="+", default=["mit_b0", "mit_b5"])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--min-size", type=int, default=320)
    parser.add_argument("--max-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/epoch_time.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    data_dir = ensure_dataset(synthetic_spec(args.images, 0))
    max_size = args.max_size or int(args.min_size * 1333 / 800)
    rows, results = [], {}
    for backbone in args.backbones:
        config = TrainConfig(data=data_dir, epochs=1, batch_size=args.batch_size,
                             min_size=args.min_size, max_size=max_size, num_workers=0,
                             evaluate_every_epoch=False)
        start = time.perf_counter()
        summary = fit(config, backbone, data_dir)
        wall = time.perf_counter() - start
        epoch = summary.history["epoch_times"][0]
        results[backbone] = {"epoch_time_sec": epoch, "wall_sec": wall,
                             "train_images_per_sec": summary.train_images_per_sec,
                             "device": summary.device}
        rows.append((backbone, f"{epoch:.1f}", f"{summary.train_images_per_sec:.2f}",
                     f"{wall:.1f}", summary.device))
    print(tabulate(rows, headers=("backbone", "epoch s", "train img/s", "wall s (build+epoch+infer)",
                                  "device"), tablefmt="github"))
    payload = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                           "threads": torch.get_num_threads(),
                           "device": str(select_device("auto"))},
               "args": vars(args), "results": results}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
