"""The work of one trial's evaluation, as plain functions that run in a Ray task.

`accuracy_pass` scores a checkpoint on every frame and draws a few; `timing_pass` times the
model alone. Both return plain values (numbers, lists, PNG bytes), so the driver needs no
access to the worker's disk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossdet_ray.data import NpyYoloDataset
from crossdet_ray.data.remote import RemoteListing, fetch_remote_dataset
from crossdet_ray.engine.drawing import draw_detections
from crossdet_ray.engine.evaluate import measure_inference
from crossdet_ray.engine.inference import coco_results, detect, frame_errors, load_detector
from crossdet_ray.engine.train import peak_memory_mb


SAMPLE_FRAMES = 4  # drawn for every trial, the same frames for all
WORST_FRAMES = 3  # drawn per trial: the most missed objects + false detections
TIMED_FRAMES = 20
WARMUP_PASSES = 2
DRAWING_SCORE_THRESHOLD = 0.5


@dataclass
class TrialJob:
    name: str
    checkpoint: str
    data_dir: str
    split: str
    test_size: float
    split_seed: int
    min_size: int | None
    max_size: int | None
    cpu: float
    gpu: float
    batch_size: int = 2
    data_listing: RemoteListing | None = None  # a bucket dataset, fetched once per node


def _device(job: TrialJob) -> torch.device:
    torch.set_num_threads(max(1, int(job.cpu)))
    return torch.device("cuda" if job.gpu > 0 and torch.cuda.is_available() else "cpu")


def _dataset(job: TrialJob) -> NpyYoloDataset:
    data_dir = job.data_dir
    if job.data_listing is not None:  # this node's copy, fetched by the first task here
        from crossdet_ray.data.resolve import default_cache

        data_dir = fetch_remote_dataset(job.data_listing, default_cache()).path
    return NpyYoloDataset(data_dir, split=job.split, test_size=job.test_size,
                          seed=job.split_seed)


def sample_indices(count: int, sample: int = SAMPLE_FRAMES) -> list[int]:
    """A fixed, evenly spread sample of frame positions (the same for every trial)."""
    if count == 0:
        return []
    return sorted({int(i) for i in np.linspace(0, count - 1, min(sample, count)).round()})


def _granted() -> dict[str, float]:
    """What Ray gave this task ({} outside Ray)."""
    try:
        import ray

        return dict(ray.get_runtime_context().get_assigned_resources())
    except Exception:  # not in a Ray worker
        return {}


def accuracy_pass(job: TrialJob) -> dict[str, Any]:
    started = time.time()
    device = _device(job)
    detector = load_detector(job.checkpoint, device, job.min_size, job.max_size)
    dataset = _dataset(job)
    detections = detect(detector, dataset, device, batch_size=job.batch_size)
    errors = frame_errors(detections.truths, detections.predictions,
                          score_threshold=DRAWING_SCORE_THRESHOLD)
    sample = sample_indices(len(dataset))
    worst = [i for i in sorted(range(len(errors)), key=lambda i: (-errors[i], i))
             if i not in sample and errors[i] > 0][:WORST_FRAMES]
    drawings = []
    for kind, indices in (("sample", sample), ("worst", worst)):
        for index in indices:
            stem = Path(detections.frames[index]).stem
            title = (f"{job.name} | {stem} | {kind} | {errors[index]} errors "
                     f"(missed + false at IoU 0.5)")
            png = draw_detections(dataset.load_image(index).numpy(), detections.truths[index],
                                  detections.predictions[index], title,
                                  score_threshold=DRAWING_SCORE_THRESHOLD)
            drawings.append({"frame": stem, "kind": kind, "errors": errors[index], "png": png})
    report = detections.report
    return {
        "backbone": detector.backbone, "epoch": detector.epoch, "params": detector.params,
        "model_size_mb": detector.model_size_mb, "num_classes": detector.num_classes,
        "min_size": detector.min_size, "max_size": detector.max_size,
        "device": str(device), "frames": len(dataset), "metrics": report.as_dict(),
        "per_class": report.per_class, "pr_recall": report.pr_recall,
        "pr_precision": report.pr_precision, "predictions": coco_results(detections),
        "frame_errors": dict(zip((Path(f).stem for f in detections.frames), errors)),
        "drawings": drawings, "history": detector.history, "resources": _granted(),
        "accuracy_window": (started, time.time()),
    }


def timing_pass(job: TrialJob) -> dict[str, Any]:
    """Inference time of the model alone, and its peak memory: CUDA's peak allocation on a
    GPU, the process's peak resident set on the CPU (Ray starts this task in a fresh
    process, so it is this model's)."""
    started = time.time()
    device = _device(job)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    detector = load_detector(job.checkpoint, device, job.min_size, job.max_size)
    timing = measure_inference(detector.model, _dataset(job), device, max_images=TIMED_FRAMES,
                               warmup=WARMUP_PASSES)
    return {"infer_ms_per_image": timing.infer_ms_per_image, "fps": timing.fps,
            "timed_images": timing.images, "peak_memory_mb": peak_memory_mb(device),
            "timing_device": str(device), "timing_window": (started, time.time())}
