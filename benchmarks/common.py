"""What the five-backbone benchmarks share: their flags and the TrainConfig they imply."""

from __future__ import annotations

import argparse

from crossdet_ray.config import BACKBONES, TrainConfig


def add_run_arguments(parser: argparse.ArgumentParser, output: str) -> None:
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--min-size", type=int, default=160)
    parser.add_argument("--images", type=int, default=32, help="synthetic frames")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--output", default=output)


def run_train_config(args: argparse.Namespace, **changes) -> TrainConfig:
    """The detector resize keeps the reference's 800:1333 ratio; no loader workers."""
    return TrainConfig(epochs=args.epochs, min_size=args.min_size,
                       max_size=max(args.min_size, int(args.min_size * 1333 / 800)),
                       num_workers=0, backbones=args.backbones, **changes)
