"""The RGB-thermal-event detection dataset: `.npy` frames with YOLO labels.

Frames stay on disk, memory-mapped, and only the requested one is copied, so a DataLoader
worker (forked or spawned) carries a few small arrays rather than the dataset.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset

from crossdet_ray.data.errors import DatasetError
from crossdet_ray.data.index import DatasetIndex, index_dataset
from crossdet_ray.data.labels import to_pixel_boxes
from crossdet_ray.data.npy_header import pixel_scale, read_npy_header

logger = logging.getLogger(__name__)

SPLITS = ("train", "test", "all")
Item = TypeVar("Item")
Target = dict[str, torch.Tensor]
Transforms = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]


def split_files(files: Sequence[Item], test_size: float = 0.2,
                seed: int = 42) -> tuple[list[Item], list[Item]]:
    """(train, test) exactly as scikit-learn's `train_test_split(files, test_size=...,
    random_state=seed)` returns them, in its (permuted) order, with numpy alone.

    The reference silently trained and tested on the same frames when scikit-learn was
    missing; reproducing its split here keeps results comparable across tools without it.
    `test_size` is a fraction in (0, 1) or, like scikit-learn, an int count of test files.
    """
    num_files = len(files)
    if isinstance(test_size, (int, np.integer)) and not isinstance(test_size, bool):
        if not 0 < test_size < num_files:
            raise DatasetError(f"test_size={test_size} must be between 1 and "
                               f"{num_files - 1} for {num_files} files")
        num_test = int(test_size)
    elif isinstance(test_size, (float, np.floating)) and 0.0 < test_size < 1.0:
        num_test = math.ceil(test_size * num_files)  # scikit-learn rounds the test side up
    else:
        raise DatasetError(f"test_size={test_size!r} must be a fraction in (0, 1) or a count")
    if num_test >= num_files:
        raise DatasetError(f"{num_files} usable frames are too few to split with "
                           f"test_size={test_size}: the train split would be empty; add "
                           "labelled frames")
    permutation = np.random.RandomState(seed).permutation(num_files)
    train = [files[i] for i in permutation[num_test:]]
    test = [files[i] for i in permutation[:num_test]]
    return train, test


def load_frame(path: str | os.PathLike) -> torch.Tensor:
    """One `(H, W, 5)` .npy frame as the detector's input: float32 `(5, H, W)` in [0, 1].

    The one place pixels are read and scaled: training, evaluation and prediction all come
    through here, so a frame is never normalised two ways.
    """
    mapped = np.load(path, mmap_mode="r")
    scale = pixel_scale(mapped.dtype)
    # One copy straight from the page cache into a contiguous (5, H, W) float32 array.
    pixels = np.ascontiguousarray(mapped.transpose(2, 0, 1), dtype=np.float32)
    del mapped  # closes the mapping
    if scale != 1.0:
        pixels /= np.float32(scale)  # division keeps the maximum at exactly 1.0
    return torch.from_numpy(pixels)


def collate_detection(batch: Sequence[tuple[torch.Tensor, Target]]
                      ) -> tuple[tuple[torch.Tensor, ...], tuple[Target, ...]]:
    """Keep images of different sizes apart: torchvision's detectors take lists."""
    if not batch:
        return (), ()
    images, targets = zip(*batch)
    return tuple(images), tuple(targets)


class NpyYoloDataset(Dataset):
    """(image, target) pairs of one split of a `DATA/images` + `DATA/labels` dataset.

    image: float32 (5, H, W) in [0, 1] (integers divided by their dtype's maximum, floats as
    stored). target: "boxes" float32 (N, 4) xyxy pixels, "labels" int64 (N,) = YOLO class + 1,
    "image_id" int64 scalar (the index in this split).
    """

    def __init__(self, data_dir: str | os.PathLike, split: str = "train",
                 test_size: float = 0.2, seed: int = 42,
                 transforms: Transforms | None = None,
                 dataset_index: DatasetIndex | None = None):
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: choose one of {', '.join(SPLITS)}")
        self.data_dir = Path(data_dir).expanduser()
        self.split = split
        self.transforms = transforms
        # `dataset_index` lets a caller that already scanned the folder parse its labels once
        # for both splits.
        index = dataset_index if dataset_index is not None else index_dataset(self.data_dir)
        # Over ALL usable frames, so the train and test splits build the same detector head.
        self.num_classes = index.num_classes

        frames = index.usable
        if split != "all":
            train, test = split_files(frames, test_size=test_size, seed=seed)
            frames = train if split == "train" else test
        self.image_files: list[str] = [frame.file_name for frame in frames]
        self._images_dir = index.images_dir

        # Boxes of all frames in one array + offsets: workers share it without the
        # copy-on-access that many small Python objects suffer after fork.
        boxes, labels, offsets = [], [], [0]
        sizes = np.zeros((len(frames), 2), dtype=np.int64)
        clipped = dropped = 0
        first_dropped = None
        for position, frame in enumerate(frames):
            header = read_npy_header(self._images_dir / frame.file_name)
            sizes[position] = header.height, header.width
            converted = to_pixel_boxes(frame.labels, header.height, header.width)
            boxes.append(converted.boxes)
            labels.append(converted.labels)
            offsets.append(offsets[-1] + len(converted.labels))
            clipped += converted.num_clipped
            dropped += converted.num_dropped
            if converted.num_dropped and first_dropped is None:
                first_dropped = frame.file_name
        self._boxes = np.concatenate(boxes or [np.zeros((0, 4), np.float32)])
        self._labels = np.concatenate(labels or [np.zeros(0, np.int64)])
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._sizes = sizes
        if clipped:
            logger.info("%s (%s split): %d boxes reaching past the frame edge were clipped",
                        self.data_dir, split, clipped)
        if dropped:
            logger.warning("%s (%s split): dropped %d zero-area boxes (first in %s); fix their "
                           "labels to train on them", self.data_dir, split, dropped, first_dropped)

    def __len__(self) -> int:
        return len(self.image_files)

    @property
    def num_boxes(self) -> int:
        return len(self._labels)

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) of a frame, from its header (no pixels read)."""
        height, width = self._sizes[index]
        return int(height), int(width)

    def load_image(self, index: int) -> torch.Tensor:
        return load_frame(self._images_dir / self.image_files[index])

    def target(self, index: int) -> Target:
        start, end = self._offsets[index], self._offsets[index + 1]
        return {
            "boxes": torch.from_numpy(self._boxes[start:end].copy()),
            "labels": torch.from_numpy(self._labels[start:end].copy()),
            "image_id": torch.tensor(index, dtype=torch.int64),
        }

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} frames")
        index = index % len(self)
        image, target = self.load_image(index), self.target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.data_dir)!r}, split={self.split!r}, "
                f"frames={len(self)}, boxes={self.num_boxes}, num_classes={self.num_classes})")
