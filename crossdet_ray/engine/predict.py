"""Run a trained checkpoint on new frames: COCO-format detections and a drawing per frame.

Frames are read by the dataset's own `load_frame` (the same scaling as in training) and the
detector's own transform resizes and normalises them with the checkpoint's min/max size, so
prediction sees exactly what evaluation saw. Boxes come back in the original frame's pixels
(torchvision's postprocess undoes the resize).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crossdet_ray.data import load_frame
from crossdet_ray.data.npy_header import read_npy_header
from crossdet_ray.engine import inference
from crossdet_ray.engine.checkpoint import CheckpointError
from crossdet_ray.engine.evaluate import coco_results

logger = logging.getLogger(__name__)


class PredictError(ValueError):
    """A user mistake: no checkpoint, not a detector checkpoint, no frames."""


@dataclass
class PredictConfig:
    checkpoint: str
    input: str
    out: str
    score_threshold: float = 0.05  # detections kept in detections.json
    draw_threshold: float = 0.5  # detections drawn on the pictures
    min_size: int | None = None  # None: the checkpoint's training config
    max_size: int | None = None
    device: str = "auto"
    draw: bool = True


def frame_files(input_path: str | Path) -> list[Path]:
    """The .npy frames named by INPUT: one file, or every .npy in a folder (sorted)."""
    path = Path(input_path)
    if path.is_file():
        if path.suffix != ".npy":
            raise PredictError(f"{path} is not a .npy frame")
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        if not files:
            raise PredictError(f"{path} holds no .npy frames")
        return files
    raise PredictError(f"{path} does not exist; pass a .npy frame or a folder of them")


@torch.no_grad()
def predict_frames(model: torch.nn.Module, files: list[Path], device: torch.device
                   ) -> list[tuple[Path, torch.Tensor, dict[str, torch.Tensor]]]:
    """(file, frame as the model saw it, its raw output on the CPU) per frame, one at a time
    (frames may differ in size)."""
    results = []
    for path in files:
        read_npy_header(path)  # a DatasetError naming the file when it is not a frame
        frame = load_frame(path)
        output = model([frame.to(device)])[0]
        results.append((path, frame, {k: v.float().cpu() if k != "labels" else v.cpu()
                                      for k, v in output.items()}))
    return results


def predict(config: PredictConfig) -> dict[str, Any]:
    """Write OUT/detections.json (and OUT/drawings/<stem>.png); return a short report."""
    from crossdet_ray.engine.train import select_device

    files = frame_files(config.input)
    device = select_device(config.device)
    try:
        loaded = inference.load_detector(config.checkpoint, device, config.min_size,
                                         config.max_size)
    except CheckpointError as error:
        raise PredictError(str(error)) from error
    model = loaded.model
    built = {"backbone": loaded.backbone, "num_classes": loaded.num_classes,
             "min_size": loaded.min_size, "max_size": loaded.max_size, "epoch": loaded.epoch}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    detections = []
    drawn = []
    for path, frame, output in predict_frames(model, files, device):
        detections += coco_results(path.stem, output, config.score_threshold)
        if config.draw:
            from crossdet_ray.engine.drawing import draw_detections

            target = out / "drawings" / f"{path.stem}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            png = draw_detections(frame.cpu().numpy(), {},
                                  {k: v.cpu().numpy() for k, v in output.items()},
                                  title=f"{path.name}: {built['backbone']}",
                                  score_threshold=config.draw_threshold)
            temporary = target.with_name(target.name + ".tmp")
            temporary.write_bytes(png)
            temporary.replace(target)  # whole or not at all
            drawn.append(str(target))
    _write_json(out / "detections.json", detections)
    logger.info("%d detections (score >= %g) on %d frames written to %s", len(detections),
                config.score_threshold, len(files), out / "detections.json")
    return {"frames": len(files), "detections": len(detections), "drawings": drawn,
            "detections_path": str(out / "detections.json"), "model": built}


def _write_json(path: Path, value: Any) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value))
    temporary.replace(path)  # atomic: a reader never sees half a file


__all__ = ["PredictConfig", "PredictError", "frame_files", "predict", "predict_frames"]
