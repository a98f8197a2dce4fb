"""YOLO label files: one parser, shared by the dataset and the preflight check.

A line is `class x_center y_center width height`, coordinates normalised to [0, 1] and the
class 0-based. The detector reserves label 0 for the background, so class c becomes label c + 1.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crossdet_ray.data.errors import DatasetError

LINE_FORMAT = "class x_center y_center width height"
# Coordinates this far outside [0, 1] are rounding noise from the labelling tool; farther
# ones are clipped just the same but worth telling the user about.
CLIP_TOLERANCE = 0.01
# Labels written with 6 decimals put an edge-touching box up to ~1e-6 outside; that is exact
# for all purposes and not counted as clipped.
ROUNDING_SLACK = 2e-6


@dataclass(frozen=True)
class YoloLabels:
    """The boxes of one label file, in file order."""

    class_ids: np.ndarray  # (N,) int64, 0-based
    boxes: np.ndarray  # (N, 4) float64: x_center, y_center, width, height in [0, 1]

    def __len__(self) -> int:
        return len(self.class_ids)


@dataclass(frozen=True)
class PixelBoxes:
    """Boxes ready for torchvision: xyxy pixels, labels shifted for the background class."""

    boxes: np.ndarray  # (M, 4) float32 x1, y1, x2, y2 in pixels
    labels: np.ndarray  # (M,) int64, class id + 1
    num_clipped: int  # boxes that reached past the frame and were cut at its edge
    num_far_outside: int  # of those, boxes more than CLIP_TOLERANCE outside
    num_dropped: int  # boxes with no area once clipped, removed


def parse_yolo_labels(text: str, source: str | os.PathLike = "<labels>") -> YoloLabels:
    """Parse a label file's text; blank lines are ignored.

    Raises DatasetError naming `source` and the 1-based line number for a line that does not
    parse, has a non-finite number, or a negative / non-integer class.
    """
    class_ids: list[int] = []
    boxes: list[tuple[float, float, float, float]] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{source}, line {line_number}"
        if len(fields) != 5:
            raise DatasetError(
                f"{where}: expected 5 fields '{LINE_FORMAT}', found {len(fields)} "
                f"({line.strip()!r}); fix or delete the line")
        try:
            values = [float(field) for field in fields]
        except ValueError:
            raise DatasetError(
                f"{where}: not all fields are numbers ({line.strip()!r}); expected "
                f"'{LINE_FORMAT}'; fix or delete the line") from None
        if not all(math.isfinite(v) for v in values):
            raise DatasetError(f"{where}: non-finite number ({line.strip()!r}); fix or delete "
                               "the line")
        class_value = values[0]
        if not class_value.is_integer():
            raise DatasetError(f"{where}: class id {fields[0]!r} is not an integer; YOLO "
                               "class ids are 0, 1, 2, ...")
        if class_value < 0:
            raise DatasetError(f"{where}: negative class id {fields[0]!r}; YOLO class ids "
                               "start at 0")
        class_ids.append(int(class_value))
        boxes.append((values[1], values[2], values[3], values[4]))
    return YoloLabels(np.asarray(class_ids, dtype=np.int64).reshape(-1),
                      np.asarray(boxes, dtype=np.float64).reshape(-1, 4))


def read_yolo_labels(path: str | os.PathLike) -> YoloLabels:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not a text file ({error}); label files hold lines "
                           f"'{LINE_FORMAT}'") from error
    except OSError as error:
        raise DatasetError(f"{path}: cannot be read ({error}); check its permissions") from error
    return parse_yolo_labels(text, path)


def to_pixel_boxes(labels: YoloLabels, height: int, width: int) -> PixelBoxes:
    """Convert to xyxy pixels, clipping to the frame and dropping boxes left with no area.

    The reference crashed on degenerate boxes (torchvision rejects x2 <= x1); they are removed
    here instead, and counted so the caller can warn.
    """
    centres, sizes = labels.boxes[:, :2], labels.boxes[:, 2:]
    corners = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)
    outside = np.maximum(-corners, corners - 1.0).max(axis=1, initial=-np.inf)
    clipped = np.clip(corners, 0.0, 1.0)
    pixels = (clipped * np.array([width, height, width, height], dtype=np.float64)
              ).astype(np.float32)
    # Judge the area on the float32 values torchvision will see.
    keep = (pixels[:, 2] > pixels[:, 0]) & (pixels[:, 3] > pixels[:, 1])
    return PixelBoxes(
        boxes=np.ascontiguousarray(pixels[keep]).reshape(-1, 4),
        labels=(labels.class_ids[keep] + 1).astype(np.int64),
        num_clipped=int(np.count_nonzero(outside > ROUNDING_SLACK)),
        num_far_outside=int(np.count_nonzero(outside > CLIP_TOLERANCE)),
        num_dropped=int(np.count_nonzero(~keep)),
    )
