"""Run directories made by hand, in the layout the training command leaves: a built detector
saved in the reference's checkpoint dict, epoch_metrics.csv and run_config.json. Much faster
than training, and the weights are chosen so that predictions are neither empty nor perfect."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from crossdet_ray.engine.run_logs import EPOCH_COLUMNS
from crossdet_ray.models import build_detector

SIZE = 64


def detector_checkpoint(seed: int, epoch: int, backbone: str = "test_mit") -> dict:
    """An untrained detector whose box classifier says "object" for every proposal, so each
    frame gets up to 100 scored boxes (the proposals): some hit, most miss."""
    torch.manual_seed(seed)
    model = build_detector(backbone, num_classes=2, min_size=SIZE, max_size=SIZE)
    state = model.state_dict()
    state["roi_heads.box_predictor.cls_score.bias"] = torch.tensor([0.0, 3.0])
    return {"epoch": epoch, "backbone": backbone, "model_state_dict": state,
            "optimizer_state_dict": {}, "scheduler_state_dict": {}, "loss": 1.0 / epoch,
            "best_loss": 1.0 / epoch, "best_epoch": epoch,
            "config": {"min_size": SIZE, "max_size": SIZE}, "history": {}}


def write_trial(run_dir: Path, name: str, backbone: str, maps: list[float], seed: int) -> Path:
    """A trial folder with one epoch file per entry of `maps` (its logged test mAP)."""
    trial = run_dir / name
    (trial / "checkpoints").mkdir(parents=True)
    (trial / "logs").mkdir()
    rows = []
    for epoch, value in enumerate(maps, start=1):
        path = trial / "checkpoints" / f"epoch_{epoch:03d}_loss_{1.0 / epoch:.4f}.pth"
        torch.save(detector_checkpoint(seed + epoch, epoch, backbone), path)
        rows.append({"epoch": epoch, "avg_loss": 1.0 / epoch, "map": value, "map50": value,
                     "checkpoint_path": str(path), "is_best": epoch == len(maps)})
    (trial / "checkpoints" / "best_model.pth").hardlink_to(path)
    (trial / "checkpoints" / f"{backbone}_final_complete.pth").hardlink_to(path)
    with open(trial / "logs" / "epoch_metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=EPOCH_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return trial


def write_run_config(run_dir: Path, data_dir: str, trials: list[tuple[str, str]]) -> None:
    backbones = sorted({b for _, b in trials})
    (run_dir / "run_config.json").write_text(json.dumps({
        "trials": [{"name": n, "backbone": b, "lr": 0.005} for n, b in trials],
        "resources": {b: {"cpu": 1.0, "gpu": 0.0, "workers": 1} for b in backbones},
        "train": {"min_size": SIZE, "max_size": SIZE, "test_size": 0.2, "split_seed": 42,
                  "batch_size": 2, "data": data_dir},
        "data": {"kind": "folder", "path": data_dir, "resolved_path": data_dir},
    }))
