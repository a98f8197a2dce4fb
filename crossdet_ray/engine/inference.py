"""A trained detector from its checkpoint file, run over frames: what evaluation and
prediction share, without Ray.

A checkpoint is the reference's dict (`backbone`, `model_state_dict`, `epoch`, ...) or a bare
state dict (`<backbone>_final.pth`), whose backbone is then read from its file name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from crossdet_ray.backbones import BACKBONE_NAMES, BACKBONE_REGISTRY, is_backbone
from crossdet_ray.config import TrainConfig
from crossdet_ray.data import NpyYoloDataset, collate_detection
from crossdet_ray.engine.checkpoint import CheckpointError, read_checkpoint_file
from crossdet_ray.engine import evaluate
from crossdet_ray.engine.evaluate import CocoReport, coco_report, predict
from crossdet_ray.models import build_detector, count_parameters

CLASS_WEIGHT_KEY = "roi_heads.box_predictor.cls_score.weight"
_BACKBONE_IN_NAME = re.compile(r"(?<![a-z0-9])(" + "|".join(BACKBONE_REGISTRY) + r")(?![0-9])")


@dataclass
class LoadedDetector:
    model: torch.nn.Module  # in eval mode, on its device
    backbone: str
    epoch: int | None  # None for a bare state dict
    history: dict[str, list]
    num_classes: int  # with the background
    params: int
    model_size_mb: float  # parameters and buffers as stored (float32)
    path: str
    min_size: int
    max_size: int


def backbone_from_name(path: str | os.PathLike) -> str | None:
    """The backbone a file's name or folders name (`mit_b1_final.pth`, `mit_b1/...`)."""
    for part in reversed(Path(path).parts):
        found = _BACKBONE_IN_NAME.search(part)
        if found:
            return found.group(1)
    return None


@dataclass
class CheckpointContents:
    state: dict[str, torch.Tensor]
    backbone: str
    epoch: int | None  # None for a bare state dict
    config: dict[str, Any]  # the training config it was saved with ({} when bare)
    history: dict[str, list]  # per-epoch lists (epoch_losses, map, ...) when saved


def read_checkpoint(path: str | os.PathLike) -> CheckpointContents:
    """What a checkpoint file holds; CheckpointError naming the file and what is wrong when
    it is not a CrossAttentionDet checkpoint."""
    loaded, path = read_checkpoint_file(path)
    if isinstance(loaded, dict) and isinstance(loaded.get("model_state_dict"), dict):
        state, backbone = loaded["model_state_dict"], loaded.get("backbone")
        epoch = int(loaded["epoch"]) if loaded.get("epoch") is not None else None
        config = loaded.get("config") if isinstance(loaded.get("config"), dict) else {}
        history = loaded.get("history") if isinstance(loaded.get("history"), dict) else {}
    elif isinstance(loaded, dict) and CLASS_WEIGHT_KEY in loaded:
        state, backbone, epoch, config, history = loaded, None, None, {}, {}
    else:
        raise CheckpointError(f"{path} is not a CrossAttentionDet checkpoint (neither a dict "
                              "with 'model_state_dict' nor a detector's state dict)")
    backbone = backbone or backbone_from_name(path)
    if not is_backbone(backbone):
        raise CheckpointError(f"{path}: cannot tell its backbone (the dict has no 'backbone' "
                              f"and the file name names none of {', '.join(BACKBONE_NAMES)})")
    if CLASS_WEIGHT_KEY not in state:
        raise CheckpointError(f"{path}: its state dict lacks {CLASS_WEIGHT_KEY}; it is not a "
                              "CrossAttentionDet detector")
    return CheckpointContents(state, backbone, epoch, config, history)


def load_detector(path: str | os.PathLike, device: torch.device, min_size: int | None = None,
                  max_size: int | None = None) -> LoadedDetector:
    """Build the checkpoint's detector and load its weights. The resize is `min_size` /
    `max_size`, else the one it trained with (its config), else the reference's 800 / 1333:
    another resize than training's silently changes every prediction."""
    contents = read_checkpoint(path)
    state, backbone = contents.state, contents.backbone
    defaults = TrainConfig()
    min_size = int(min_size or contents.config.get("min_size") or defaults.min_size)
    max_size = int(max_size or contents.config.get("max_size") or defaults.max_size)
    num_classes = int(state[CLASS_WEIGHT_KEY].shape[0])
    model = build_detector(backbone, num_classes=num_classes, min_size=min_size,
                           max_size=max_size)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit {backbone}: "
                              f"{str(error).splitlines()[0]}") from error
    stored_bytes = sum(t.numel() * t.element_size()
                       for t in list(model.parameters()) + list(model.buffers()))
    model.to(device).eval()
    return LoadedDetector(model=model, backbone=backbone, epoch=contents.epoch,
                          history=contents.history, num_classes=num_classes,
                          params=count_parameters(model), model_size_mb=stored_bytes / 2**20,
                          path=str(path), min_size=min_size, max_size=max_size)


@dataclass
class Detections:
    """One model's detections over a dataset's frames, in its order, with the ground truth."""

    frames: list[str]  # file names under images/
    sizes: list[tuple[int, int]]  # (height, width)
    truths: list[dict[str, np.ndarray]]  # "boxes" xyxy pixels, "labels" (class + 1)
    predictions: list[dict[str, np.ndarray]]  # plus "scores"
    report: CocoReport


def detect(detector: LoadedDetector, dataset: NpyYoloDataset, device: torch.device,
           batch_size: int = 2) -> Detections:
    """Run the detector over every frame of `dataset` and score it with pycocotools."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                        collate_fn=collate_detection)
    truths, predictions, sizes = predict(detector.model, loader, device)
    as_numpy = [{k: v.numpy() for k, v in p.items()} for p in predictions]
    truths = [{k: v.numpy() for k, v in t.items()} for t in truths]
    report = coco_report(truths, as_numpy, sizes, detector.num_classes)
    return Detections(frames=list(dataset.image_files), sizes=[tuple(s) for s in sizes],
                      truths=truths, predictions=as_numpy, report=report)


def coco_results(detections: Detections, min_score: float = 0.0) -> list[dict[str, Any]]:
    """Every frame's detections in COCO's results format (engine.evaluate.coco_results), each
    frame's image_id its file stem."""
    return [entry for frame, predicted in zip(detections.frames, detections.predictions)
            for entry in evaluate.coco_results(Path(frame).stem, predicted, min_score)]


def frame_errors(truths: Sequence[dict], predictions: Sequence[dict], iou: float = 0.5,
                 score_threshold: float = 0.5) -> list[int]:
    """Per frame: missed objects + false detections, at `score_threshold` and `iou`.

    Greedy matching by score, class by class, as a person counting mistakes on a drawing
    would; it ranks frames (the worst ones are drawn), it is not a metric.
    """
    from torchvision.ops import box_iou

    errors = []
    for truth, predicted in zip(truths, predictions):
        keep = np.asarray(predicted["scores"]) >= score_threshold
        boxes = torch.as_tensor(np.asarray(predicted["boxes"])[keep], dtype=torch.float32)
        labels = np.asarray(predicted["labels"])[keep]
        order = np.argsort(-np.asarray(predicted["scores"])[keep], kind="stable")
        truth_boxes = torch.as_tensor(np.asarray(truth["boxes"]), dtype=torch.float32)
        truth_labels = np.asarray(truth["labels"])
        matched = np.zeros(len(truth_labels), dtype=bool)
        overlaps = box_iou(boxes.reshape(-1, 4), truth_boxes.reshape(-1, 4)).numpy()
        false_detections = 0
        for index in order:
            candidates = np.where((truth_labels == labels[index]) & ~matched
                                  & (overlaps[index] >= iou))[0]
            if candidates.size:
                matched[candidates[np.argmax(overlaps[index, candidates])]] = True
            else:
                false_detections += 1
        errors.append(int((~matched).sum()) + false_detections)
    return errors
