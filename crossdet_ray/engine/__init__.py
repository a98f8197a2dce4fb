"""Training and evaluation of one backbone, without Ray."""

from crossdet_ray.engine.checkpoint import CheckpointError, epoch_checkpoint_name, load_checkpoint
from crossdet_ray.engine.evaluate import CocoMetrics, coco_metrics, evaluate_coco, measure_inference
from crossdet_ray.engine.run_logs import BATCH_COLUMNS, EPOCH_COLUMNS, SeedLogWriter
from crossdet_ray.engine.storage import RunStorage
from crossdet_ray.engine.train import (
    BatchMetrics,
    EpochMetrics,
    NonFiniteLossError,
    TrainingListener,
    TrainingStopped,
    TrainingSummary,
    fit,
    select_device,
)

__all__ = [
    "BATCH_COLUMNS", "EPOCH_COLUMNS", "BatchMetrics", "CheckpointError", "CocoMetrics",
    "EpochMetrics", "NonFiniteLossError", "RunStorage", "SeedLogWriter", "TrainingListener",
    "TrainingStopped", "TrainingSummary", "coco_metrics", "epoch_checkpoint_name", "evaluate_coco", "fit",
    "load_checkpoint", "measure_inference", "select_device",
]
