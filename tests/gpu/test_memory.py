"""mit_b4 and mit_b5 train at the reference's full size (batch 2 of 800x1333 frames) within a
40 GB GPU, with the product's CUDA defaults (bf16, activation checkpointing, channels_last)."""

from __future__ import annotations

import gc
import json
import math

import torch

from crossdet_ray.config import TrainConfig
from crossdet_ray.engine.train import (NullListener, build_model, build_optimizer, train_one_epoch,
                                       use_activation_checkpointing, use_amp)

LIMIT_GIB = 40.0
HEIGHT, WIDTH = 800, 1333  # the detector's resize leaves these as they are
STEPS = 3


def _batches(steps: int, batch_size: int):
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(5, HEIGHT, WIDTH, generator=generator) for _ in range(batch_size)]
    boxes = torch.tensor([[100.0, 120.0, 400.0, 500.0], [700.0, 200.0, 900.0, 600.0],
                          [1000.0, 50.0, 1300.0, 700.0]])
    targets = [{"boxes": boxes.clone(), "labels": torch.ones(len(boxes), dtype=torch.int64)}
               for _ in range(batch_size)]
    return [(images, targets)] * steps


def _peak_training_memory(config: TrainConfig, backbone: str, device: torch.device) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    model = build_model(config, backbone, num_classes=2, device=device).to(device)
    optimizer, _ = build_optimizer(config, model)
    sums = train_one_epoch(model, optimizer, _batches(STEPS, config.batch_size), device, epoch=1,
                           listener=NullListener(), amp=use_amp(config, device))
    torch.cuda.synchronize(device)
    record = {
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "frame": [HEIGHT, WIDTH], "batch_size": config.batch_size, "steps": sums["batches"],
        "mean_loss": sums["loss"] / max(sums["batches"], 1),
        "amp_bf16": use_amp(config, device),
        "activation_checkpointing": use_activation_checkpointing(config, backbone, device),
        "gpu": torch.cuda.get_device_name(device),
    }
    del model, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    return record


def test_mit_b4_and_b5_train_at_800x1333_within_40_gib(cuda, tmp_path):
    config = TrainConfig(batch_size=2, min_size=HEIGHT, max_size=WIDTH, device="cuda")
    peaks = {backbone: _peak_training_memory(config, backbone, cuda)
             for backbone in ("mit_b4", "mit_b5")}
    out = tmp_path / "peak_memory_800x1333.json"
    out.write_text(json.dumps(peaks, indent=2))
    for backbone, record in peaks.items():
        print(f"{backbone}: peak {record['peak_gib']:.2f} GiB at batch 2 of "
              f"{HEIGHT}x{WIDTH} ({out})")

    for backbone, record in peaks.items():
        assert record["steps"] == STEPS
        assert math.isfinite(record["mean_loss"])
        assert record["amp_bf16"] and record["activation_checkpointing"], "not CUDA's defaults"
        assert record["peak_gib"] < LIMIT_GIB, f"{backbone} needs {record['peak_gib']:.1f} GiB"
