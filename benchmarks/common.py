"""What the benchmarks share: the five-backbone flags, the TrainConfig they imply, JSON output."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import torch

from crossdet_ray.config import BACKBONES, TrainConfig


def add_run_arguments(parser: argparse.ArgumentParser, output: str) -> None:
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--min-size", type=int, default=160)
    parser.add_argument("--images", type=int, default=32, help="synthetic frames")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--output", default=output)


def run_train_config(args: argparse.Namespace, **changes) -> TrainConfig:
    """The detector resize keeps the reference's 800:1333 ratio; no loader workers unless
    `changes` says otherwise."""
    changes.setdefault("num_workers", 0)
    return TrainConfig(epochs=args.epochs, min_size=args.min_size,
                       max_size=max(args.min_size, int(args.min_size * 1333 / 800)),
                       backbones=args.backbones, **changes)


def write_results(args: argparse.Namespace, **payload: Any) -> None:
    """`args.output` as JSON: the machine, the arguments, then `payload`."""
    machine = {"platform": platform.platform(), "torch": torch.__version__,
               "threads": torch.get_num_threads()}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"machine": machine, "args": vars(args), **payload},
                                            indent=2))
