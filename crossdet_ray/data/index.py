"""Find a dataset's frames and parse its labels, once, for the dataset and the preflight.

Layout: `DATA/images/<stem>.npy` and `DATA/labels/<stem>.txt`. A frame is usable when its label
file exists and holds at least one box line; the others are listed with the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from crossdet_ray.data.errors import DatasetError
from crossdet_ray.data.labels import YoloLabels, read_yolo_labels

IMAGES_DIR = "images"
LABELS_DIR = "labels"
FRAME_SUFFIX = ".npy"
LABEL_SUFFIX = ".txt"

NO_LABEL_FILE = "no label file"
EMPTY_LABEL_FILE = "empty label file"


@dataclass(frozen=True)
class LabelledFrame:
    file_name: str  # "<stem>.npy", relative to images/
    labels: YoloLabels


@dataclass
class DatasetIndex:
    data_dir: Path
    usable: list[LabelledFrame]  # sorted by file name
    skipped: list[tuple[str, str]]  # (frame file name, reason), sorted by file name
    orphan_labels: list[str] = field(default_factory=list)  # label files with no frame

    @property
    def images_dir(self) -> Path:
        return self.data_dir / IMAGES_DIR

    @property
    def num_frames(self) -> int:
        return len(self.usable) + len(self.skipped)

    @property
    def num_classes(self) -> int:
        """Highest class id over every usable frame + 1 (0 when there are no boxes)."""
        highest = max((int(f.labels.class_ids.max()) for f in self.usable), default=-1)
        return highest + 1


def _files_with_suffix(folder: Path, suffix: str) -> dict[str, str]:
    """{stem: file name} for the plain files in `folder` ending in `suffix`."""
    found = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.endswith(suffix) and entry.is_file():
                found[entry.name[: -len(suffix)]] = entry.name
    return found


def index_dataset(data_dir: str | os.PathLike) -> DatasetIndex:
    """Scan `data_dir`, parsing every label file of a frame.

    Raises DatasetError for a missing folder, a label file that does not parse, or a dataset
    without a single usable frame.
    """
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir}: dataset folder not found; pass the folder that holds "
                           f"{IMAGES_DIR}/ and {LABELS_DIR}/")
    images_dir, labels_dir = data_dir / IMAGES_DIR, data_dir / LABELS_DIR
    for folder, content in ((images_dir, "one <name>.npy array (H, W, 5) per frame"),
                            (labels_dir, "one YOLO <name>.txt per frame")):
        if not folder.is_dir():
            raise DatasetError(f"{folder}: folder not found; a dataset holds {IMAGES_DIR}/ "
                               f"and {LABELS_DIR}/ side by side, {folder.name}/ with {content}")

    frames = _files_with_suffix(images_dir, FRAME_SUFFIX)
    label_files = _files_with_suffix(labels_dir, LABEL_SUFFIX)
    usable: list[LabelledFrame] = []
    skipped: list[tuple[str, str]] = []
    for stem, file_name in sorted(frames.items(), key=lambda item: item[1]):
        label_name = label_files.get(stem)
        if label_name is None:
            skipped.append((file_name, NO_LABEL_FILE))
            continue
        labels = read_yolo_labels(labels_dir / label_name)
        if len(labels) == 0:
            skipped.append((file_name, EMPTY_LABEL_FILE))
            continue
        usable.append(LabelledFrame(file_name, labels))
    orphan_labels = sorted(name for stem, name in label_files.items() if stem not in frames)

    if not usable:
        if not frames:
            detail = f"{images_dir} holds no {FRAME_SUFFIX} frame"
        else:
            detail = (f"none of the {len(frames)} frames in {images_dir} has a non-empty label "
                      f"file in {labels_dir}")
            if orphan_labels:
                detail += (f" ({len(orphan_labels)} label files match no frame, e.g. "
                           f"{orphan_labels[0]}: do the file names match?)")
        raise DatasetError(f"no usable frame: {detail}; each frame <name>.npy needs a "
                           f"{LABELS_DIR}/<name>.txt with at least one box line")
    return DatasetIndex(data_dir, usable, skipped, orphan_labels)
