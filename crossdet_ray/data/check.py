"""Preflight a dataset before any trial starts: every label file, every frame's header.

Pixels are never read, so 10,000 frames take seconds; a problem that would crash a trial hours
later (a truncated copy, a garbled label line) stops the run now, with the file to fix.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field

from crossdet_ray.data.errors import DatasetError
from crossdet_ray.data.index import IMAGES_DIR, DatasetFiles, FolderFiles, index_dataset
from crossdet_ray.data.labels import CLIP_TOLERANCE, to_pixel_boxes

logger = logging.getLogger(__name__)

__all__ = ["DatasetError", "DatasetReport", "check_dataset"]


@dataclass
class DatasetReport:
    data_dir: str
    num_images: int  # .npy frames found
    num_usable: int  # frames with a non-empty label file
    num_boxes: int  # boxes the detector will train on (zero-area ones dropped)
    classes: list[int]  # YOLO class ids present, sorted
    num_classes: int  # highest class id + 1 (the detector adds a background class)
    num_train: int  # frames in the train / test split for the checked test_size
    num_test: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (frame file, reason)
    min_height: int = 0  # frame sizes of the usable frames
    max_height: int = 0
    min_width: int = 0
    max_width: int = 0
    dtypes: list[str] = field(default_factory=list)  # dtypes of the usable frames
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"{self.data_dir}: {self.num_usable} usable frames of {self.num_images} "
            f"({self.num_train} train / {self.num_test} test), {self.num_boxes} boxes, "
            f"classes {self.classes} (num_classes {self.num_classes})",
            f"frame sizes: height {self.min_height}-{self.max_height}, width "
            f"{self.min_width}-{self.max_width}; dtypes {', '.join(self.dtypes)}",
        ]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def check_dataset(data_dir: str | os.PathLike, test_size: float = 0.2,
                  files: DatasetFiles | None = None) -> DatasetReport:
    """Validate `data_dir` (or `files`, a bucket read ahead: data/remote.py) and describe it;
    raises DatasetError naming the file or object to fix."""
    files = files if files is not None else FolderFiles(data_dir)
    index = index_dataset(data_dir, files)
    warnings: list[str] = []

    heights, widths, dtypes, classes = [], [], Counter(), set()
    num_boxes = clipped = far_outside = dropped = emptied = 0
    first_far_outside = first_dropped = None
    for frame in index.usable:
        header = files.header(f"{IMAGES_DIR}/{frame.file_name}")
        heights.append(header.height)
        widths.append(header.width)
        dtypes[str(header.dtype)] += 1
        classes.update(int(c) for c in frame.labels.class_ids)
        converted = to_pixel_boxes(frame.labels, header.height, header.width)
        num_boxes += len(converted.labels)
        clipped += converted.num_clipped
        far_outside += converted.num_far_outside
        dropped += converted.num_dropped
        if converted.num_far_outside and first_far_outside is None:
            first_far_outside = frame.file_name
        if converted.num_dropped and first_dropped is None:
            first_dropped = frame.file_name
        if len(converted.labels) == 0:
            emptied += 1

    # Frames that will not be used still get their header read: a broken one is worth a
    # warning, not a stop, since training never opens it.
    unreadable_unused = []
    for file_name, _reason in index.skipped:
        try:
            files.header(f"{IMAGES_DIR}/{file_name}")
        except DatasetError as error:
            unreadable_unused.append(str(error))

    if clipped:
        warnings.append(f"{clipped} boxes reach past the frame edge and are clipped to it")
    if far_outside:
        warnings.append(f"{far_outside} of them by more than {CLIP_TOLERANCE:g} of the frame "
                        f"(first in {first_far_outside}): check those labels' coordinates")
    if dropped:
        warnings.append(f"{dropped} zero-area boxes are dropped (first in {first_dropped}); "
                        "fix their width/height to train on them")
    if emptied:
        warnings.append(f"{emptied} frames keep no box once zero-area boxes are dropped; they "
                        "train as background only")
    if index.skipped:
        reasons = Counter(reason for _name, reason in index.skipped)
        detail = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
        warnings.append(f"{len(index.skipped)} frames are not used ({detail})")
    if unreadable_unused:
        warnings.append(f"{len(unreadable_unused)} unused frames are unreadable too, e.g. "
                        f"{unreadable_unused[0]}")
    if index.orphan_labels:
        warnings.append(f"{len(index.orphan_labels)} label files match no frame (e.g. "
                        f"{index.orphan_labels[0]}) and are ignored")

    num_usable = len(index.usable)
    num_test = min(math.ceil(test_size * num_usable), num_usable)
    if num_test >= num_usable:
        warnings.append(f"{num_usable} usable frames are too few for a train/test split with "
                        f"test_size={test_size}")

    report = DatasetReport(
        data_dir=files.where(), num_images=index.num_frames, num_usable=num_usable,
        num_boxes=num_boxes, classes=sorted(classes), num_classes=index.num_classes,
        num_train=num_usable - num_test, num_test=num_test, skipped=list(index.skipped),
        min_height=min(heights), max_height=max(heights), min_width=min(widths),
        max_width=max(widths), dtypes=sorted(dtypes), warnings=warnings)
    for warning in warnings:
        logger.warning("%s: %s", files.where(), warning)
    return report
