"""Training and evaluation of one backbone, without Ray.

The names below are imported on first use (PEP 562), so `crossdet_ray.engine.run_logs` or
`.storage` alone (the driver's needs) do not import the model and torchvision.
"""

from crossdet_ray.lazy_exports import lazy_exports

_EXPORTS = {
    "CheckpointError": "checkpoint", "epoch_checkpoint_name": "checkpoint",
    "load_checkpoint": "checkpoint",
    "CocoMetrics": "evaluate", "coco_metrics": "evaluate", "evaluate_coco": "evaluate",
    "measure_inference": "evaluate",
    "BATCH_COLUMNS": "run_logs", "EPOCH_COLUMNS": "run_logs", "SeedLogWriter": "run_logs",
    "RunStorage": "storage",
    "BatchMetrics": "train", "EpochMetrics": "train", "NonFiniteLossError": "train",
    "TrainingListener": "train", "TrainingStopped": "train", "TrainingSummary": "train",
    "fit": "train", "select_device": "train",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
