"""Training and evaluation of one backbone, without Ray.

The names below are imported on first use (PEP 562), so `crossdet_ray.engine.run_logs` or
`.storage` alone (the driver's needs) do not import the model and torchvision.
"""

from importlib import import_module

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


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:  # `from crossdet_ray.engine import train` then imports the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
