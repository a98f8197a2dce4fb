"""COCO metrics through pycocotools, and inference timing, for one detector.

Like torchvision's detection references: ground truth and detections are turned into COCO's
json structures and scored by COCOeval; nothing is approximated here.
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

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


@dataclass
class CocoReport:
    """Everything COCOeval says about one model on one set of frames.

    `per_class`: {category id: {"ap", "ap50"}} for the categories with ground truth (AP is None
    when COCO has nothing to score). `pr_recall` / `pr_precision`: COCO's interpolated
    precision at its 101 recall thresholds, IoU 0.5, all areas, 100 detections, averaged
    over those categories (empty without ground truth).
    """

    map: float
    map50: float
    map75: float
    map_small: float | None  # None: no object of that size in the ground truth
    map_medium: float | None
    map_large: float | None
    ar100: float
    per_class: dict[int, dict[str, float | None]]
    pr_recall: list[float]
    pr_precision: list[float]

    def metrics(self) -> CocoMetrics:
        return CocoMetrics(self.map, self.map50, self.map75)

    def as_dict(self) -> dict[str, Any]:
        return {"map": self.map, "map50": self.map50, "map75": self.map75,
                "map_small": self.map_small, "map_medium": self.map_medium,
                "map_large": self.map_large, "ar100": self.ar100}


def _coco_truth(ground_truths: Sequence[dict], image_sizes: Sequence[tuple[int, int]],
                num_classes: int) -> dict[str, list]:
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
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_results(image_id: int | str, predicted: dict, min_score: float = 0.0) -> list[dict]:
    """One frame's detections ("boxes" xyxy, "labels", "scores": arrays or CPU tensors) in
    COCO's results format: bbox [x, y, width, height] in the frame's pixels, category_id the
    detector's label (YOLO class + 1); those scoring below `min_score` left out. The one
    formatter of detections: evaluation, the evaluation's files and prediction use it."""
    labels = np.asarray(predicted["labels"]).reshape(-1)
    scores = np.asarray(predicted["scores"]).reshape(-1)
    return [{"image_id": image_id, "category_id": int(label),
             "bbox": [float(v) for v in box], "score": float(score)}
            for box, label, score in zip(_xyxy_to_xywh(predicted["boxes"]), labels, scores)
            if score >= min_score]


def _coco_detections(predictions: Sequence[dict]) -> list[dict]:
    return [entry for image_id, predicted in enumerate(predictions)
            for entry in coco_results(image_id, predicted)]


def _run_cocoeval(dataset: dict[str, list], detections: list[dict]) -> COCOeval | None:
    """COCOeval after accumulate(); None when there is nothing to score (COCO's AP is 0)."""
    if not dataset["annotations"] or not detections:
        # COCO defines AP as 0 with nothing detected; loadRes rejects an empty list.
        return None
    # pycocotools prints its progress to stdout; keep the trial's output readable.
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = dataset
        truth.createIndex()
        detected = truth.loadRes(detections)
        evaluator = COCOeval(truth, detected, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


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
    return coco_report(ground_truths, predictions, image_sizes, num_classes).metrics()


def coco_report(
    ground_truths: Sequence[dict],
    predictions: Sequence[dict],
    image_sizes: Sequence[tuple[int, int]],
    num_classes: int,
) -> CocoReport:
    """`coco_metrics` plus COCO's size breakdown, AR@100, per-class AP and the PR curve."""
    dataset = _coco_truth(ground_truths, image_sizes, num_classes)
    present = sorted({a["category_id"] for a in dataset["annotations"]})
    evaluator = _run_cocoeval(dataset, _coco_detections(predictions))
    if evaluator is None:
        # Nothing detected: AP 0 for every size that has objects (COCO's area ranges).
        areas = [a["area"] for a in dataset["annotations"]]
        sizes = [0.0 if any(low <= area < high for area in areas) else None
                 for low, high in ((0, 32**2), (32**2, 96**2), (96**2, float("inf")))]
        return CocoReport(0.0, 0.0, 0.0, *sizes, 0.0,
                          {c: {"ap": 0.0, "ap50": 0.0} for c in present}, [], [])
    stats = [float(s) for s in evaluator.stats]
    # -1 means "no such objects": 0 for the headline numbers (as the training logs do),
    # None for the size breakdown, where "no small objects" is not "missed them all".
    main = [max(s, 0.0) for s in stats[:3]]
    sizes = [s if s >= 0 else None for s in stats[3:6]]
    precision = evaluator.eval["precision"]  # [IoU, recall, category, area, max detections]
    category_ids = list(evaluator.params.catIds)
    per_class = {}
    for category in present:
        index = category_ids.index(category)
        per_class[category] = {
            "ap": _mean_valid(precision[:, :, index, 0, -1]),
            "ap50": _mean_valid(precision[0, :, index, 0, -1]),
        }
    at_50 = precision[0, :, [category_ids.index(c) for c in present], 0, -1]  # (classes, R)
    valid = at_50 > -1
    counts = valid.sum(axis=0)
    curve = np.where(counts > 0, np.where(valid, at_50, 0).sum(axis=0) / np.maximum(counts, 1),
                     0.0)
    return CocoReport(map=main[0], map50=main[1], map75=main[2], map_small=sizes[0],
                      map_medium=sizes[1], map_large=sizes[2], ar100=max(stats[8], 0.0),
                      per_class=per_class,
                      pr_recall=[float(r) for r in evaluator.params.recThrs],
                      pr_precision=[float(p) for p in curve])


def _mean_valid(values: np.ndarray) -> float | None:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


@torch.inference_mode()
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
    """Time single-image inference over the first images of `dataset`: the model alone.

    The frames are read and put on `device` first, so no disk read or host-to-device copy is
    timed; `warmup` passes run before the clock starts (allocator, cuDNN autotuning), and CUDA
    is synchronised on both sides of the timed loop.
    """
    was_training = model.training
    model.eval()
    count = min(len(dataset), max_images)
    frames = [dataset[index][0].to(device) for index in range(count)]
    for frame in frames[:min(warmup, count)]:
        model([frame])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for frame in frames:
        model([frame])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    model.train(was_training)
    if count == 0:
        return InferenceTiming(0.0, 0.0, 0)
    per_image = elapsed / count
    return InferenceTiming(infer_ms_per_image=per_image * 1000.0, fps=1.0 / per_image, images=count)
