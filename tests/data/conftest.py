"""Builders for tiny hand-made datasets in the `images/*.npy` + `labels/*.txt` layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


class DatasetBuilder:
    """Writes frames and label files under `root`, creating images/ and labels/."""

    def __init__(self, root: Path):
        self.root = root
        self.images = root / "images"
        self.labels_dir = root / "labels"
        self.images.mkdir(parents=True, exist_ok=True)
        self.labels_dir.mkdir(parents=True, exist_ok=True)

    def frame(self, stem: str, height: int = 32, width: int = 32, dtype=np.uint8,
              array: np.ndarray | None = None) -> Path:
        if array is None:
            array = np.zeros((height, width, 5), dtype=dtype)
        path = self.images / f"{stem}.npy"
        np.save(path, array)
        return path

    def label(self, stem: str, *lines: str) -> Path:
        path = self.labels_dir / f"{stem}.txt"
        path.write_text("".join(line + "\n" for line in lines))
        return path

    def labelled(self, stem: str, *lines: str, **frame_options) -> Path:
        self.label(stem, *(lines or ("0 0.5 0.5 0.25 0.25",)))
        return self.frame(stem, **frame_options)


@pytest.fixture
def builder(tmp_path) -> DatasetBuilder:
    return DatasetBuilder(tmp_path / "DATA")
