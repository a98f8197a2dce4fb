"""Data layer: `.npy` RGB-thermal-event frames with YOLO labels, their split and preflight."""

from crossdet_ray.data.check import DatasetReport, check_dataset
from crossdet_ray.data.dataset import NpyYoloDataset, collate_detection, load_frame, split_files
from crossdet_ray.data.errors import DatasetError

__all__ = ["DatasetError", "DatasetReport", "NpyYoloDataset", "check_dataset",
           "collate_detection", "load_frame", "split_files"]
