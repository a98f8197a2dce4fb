"""Find a dataset's frames and parse its labels, once, for the dataset and the preflight.

Layout: `DATA/images/<stem>.npy` and `DATA/labels/<stem>.txt`. A frame is usable when its label
file exists and holds at least one box line; the others are listed with the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from crossdet_ray.data.errors import DatasetError
from crossdet_ray.data.labels import YoloLabels, read_yolo_labels
from crossdet_ray.data.npy_header import NpyHeader, read_npy_header

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


class DatasetFiles(Protocol):
    """Where a dataset's files are read from: a folder here, or a bucket read ahead of time
    (data/remote.py). The index and the preflight read through it, so both kinds are checked
    by the same code and their errors name the file or object to fix."""

    def where(self, relative: str = "") -> str:
        """The path or URI of `relative`, for messages."""

    def names(self, folder: str, suffix: str) -> dict[str, str] | None:
        """{stem: file name} of the files in `folder` ending in `suffix`; None: no such folder."""

    def labels(self, relative: str) -> YoloLabels: ...

    def header(self, relative: str) -> NpyHeader: ...


class FolderFiles:
    """A dataset folder on this machine."""

    def __init__(self, data_dir: str | os.PathLike):
        self.root = Path(data_dir).expanduser()

    def where(self, relative: str = "") -> str:
        return str(self.root / relative) if relative else str(self.root)

    def exists(self) -> bool:
        return self.root.is_dir()

    def names(self, folder: str, suffix: str) -> dict[str, str] | None:
        if not (self.root / folder).is_dir():
            return None
        found = {}
        with os.scandir(self.root / folder) as entries:
            for entry in entries:
                if entry.name.endswith(suffix) and entry.is_file():
                    found[entry.name[: -len(suffix)]] = entry.name
        return found

    def labels(self, relative: str) -> YoloLabels:
        return read_yolo_labels(self.root / relative)

    def header(self, relative: str) -> NpyHeader:
        return read_npy_header(self.root / relative)


def index_dataset(data_dir: str | os.PathLike, files: DatasetFiles | None = None) -> DatasetIndex:
    """Scan `data_dir` (or `files`, a bucket read ahead), parsing every label file of a frame.

    Raises DatasetError for a missing folder, a label file that does not parse, or a dataset
    without a single usable frame.
    """
    files = files if files is not None else FolderFiles(data_dir)
    if isinstance(files, FolderFiles) and not files.exists():
        raise DatasetError(f"{files.where()}: dataset folder not found; pass the folder "
                           f"that holds {IMAGES_DIR}/ and {LABELS_DIR}/")
    images_dir, labels_dir = files.where(IMAGES_DIR), files.where(LABELS_DIR)
    found = {}
    for folder, suffix, content in (
            (IMAGES_DIR, FRAME_SUFFIX, "one <name>.npy array (H, W, 5) per frame"),
            (LABELS_DIR, LABEL_SUFFIX, "one YOLO <name>.txt per frame")):
        found[folder] = files.names(folder, suffix)
        if found[folder] is None:
            raise DatasetError(f"{files.where(folder)}: folder not found; a dataset holds "
                               f"{IMAGES_DIR}/ and {LABELS_DIR}/ side by side, {folder}/ with "
                               f"{content}")

    frames, label_files = found[IMAGES_DIR], found[LABELS_DIR]
    usable: list[LabelledFrame] = []
    skipped: list[tuple[str, str]] = []
    for stem, file_name in sorted(frames.items(), key=lambda item: item[1]):
        label_name = label_files.get(stem)
        if label_name is None:
            skipped.append((file_name, NO_LABEL_FILE))
            continue
        labels = files.labels(f"{LABELS_DIR}/{label_name}")
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
    return DatasetIndex(Path(data_dir).expanduser(), usable, skipped, orphan_labels)
