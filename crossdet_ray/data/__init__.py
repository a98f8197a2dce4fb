"""Data layer: `.npy` RGB-thermal-event frames with YOLO labels, their split and preflight.

The names below are imported on first use (PEP 562): the preflight (`check_dataset`) needs
numpy only, the data set and its collate function need torch.
"""

from crossdet_ray.lazy_exports import lazy_exports

_EXPORTS = {
    "DatasetReport": "check", "check_dataset": "check",
    "NpyYoloDataset": "dataset", "collate_detection": "dataset", "load_frame": "dataset",
    "split_files": "dataset",
    "DatasetError": "errors",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
