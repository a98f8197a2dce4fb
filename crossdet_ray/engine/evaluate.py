"""COCO metrics through pycocotools, and inference timing, for one detector.

Like torchvision's detection references: ground truth and detections are turned into COCO's
json structures and scored by COCOeval; nothing is approximated here.
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


@dataclass
class CocoMetrics:
    map: float  # AP averaged over IoU 0.50:0.95
    map50: float
    map75: float

    def as_dict(self) -> dict[str, float]:
        return {"map": self.map, "map50": self.map50, "map75": self.map75}


@dataclass
class InferenceTiming:
    infer_ms_per_image: float
    fps: float
    images: int


def _xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0],
                     boxes[:, 3] - boxes[:, 1]], axis=1)


def coco_metrics(
    ground_truths: Sequence[dict],
    predictions: Sequence[dict],
    image_sizes: Sequence[tuple[int, int]],
    num_classes: int,
) -> CocoMetrics:
    """Score detections against ground truth.

    `ground_truths[i]` holds "boxes" (xyxy) and "labels"; `predictions[i]` the same plus
    "scores"; both indexed like `image_sizes` (height, width).
    """
    images, annotations = [], []
    for image_id, ((height, width), truth) in enumerate(zip(image_sizes, ground_truths)):
        images.append({"id": image_id, "height": int(height), "width": int(width)})
        labels = np.asarray(truth["labels"]).reshape(-1)
        for box, label in zip(_xyxy_to_xywh(truth["boxes"]), labels):
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                "bbox": [float(v) for v in box], "area": float(box[2] * box[3]), "iscrowd": 0,
            })
    categories = [{"id": c} for c in range(1, num_classes + 1)]
    detections = []
    for image_id, predicted in enumerate(predictions):
        labels = np.asarray(predicted["labels"]).reshape(-1)
        scores = np.asarray(predicted["scores"]).reshape(-1)
        for box, label, score in zip(_xyxy_to_xywh(predicted["boxes"]), labels, scores):
            detections.append({"image_id": image_id, "category_id": int(label),
                               "bbox": [float(v) for v in box], "score": float(score)})
    if not annotations or not detections:
        # COCO defines AP as 0 with nothing detected; loadRes rejects an empty list.
        return CocoMetrics(0.0, 0.0, 0.0)

    # pycocotools prints its progress to stdout; keep the trial's output readable.
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = {"images": images, "annotations": annotations, "categories": categories}
        truth.createIndex()
        detected = truth.loadRes(detections)
        evaluator = COCOeval(truth, detected, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [max(float(s), 0.0) for s in evaluator.stats[:3]]  # -1 means "no such objects"
    return CocoMetrics(map=stats[0], map50=stats[1], map75=stats[2])


@torch.no_grad()
def predict(model: torch.nn.Module, loader: Iterable, device: torch.device):
    """Run the detector over a loader; returns (truths, predictions, image sizes) on the CPU."""
    was_training = model.training
    model.eval()
    truths, predictions, sizes = [], [], []
    for images, targets in loader:
        outputs = model([image.to(device) for image in images])
        for image, target, output in zip(images, targets, outputs):
            sizes.append(tuple(image.shape[-2:]))
            truths.append({k: target[k].cpu() for k in ("boxes", "labels")})
            predictions.append({k: output[k].cpu() for k in ("boxes", "labels", "scores")})
    model.train(was_training)
    return truths, predictions, sizes


def evaluate_coco(model: torch.nn.Module, loader: Iterable, device: torch.device,
                  num_classes: int) -> CocoMetrics:
    truths, predictions, sizes = predict(model, loader, device)
    return coco_metrics(truths, predictions, sizes, num_classes)


@torch.no_grad()
def measure_inference(model: torch.nn.Module, dataset, device: torch.device,
                      max_images: int = 20, warmup: int = 1) -> InferenceTiming:
    """Time single-image inference over the first images of `dataset` (after a warm-up)."""
    was_training = model.training
    model.eval()
    count = min(len(dataset), max_images)
    for index in range(min(warmup, count)):
        model([dataset[index][0].to(device)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for index in range(count):
        model([dataset[index][0].to(device)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    model.train(was_training)
    if count == 0:
        return InferenceTiming(0.0, 0.0, 0)
    per_image = elapsed / count
    return InferenceTiming(infer_ms_per_image=per_image * 1000.0, fps=1.0 / per_image, images=count)
