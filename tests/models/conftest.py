"""Detectors built once per session: mit_b5 alone costs seconds to construct."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crossdet_ray.models import build_detector

# A copy of ../shared/reference/state_dict_manifest.json: the reference's keys and shapes.
MANIFEST = Path(__file__).resolve().parent / "state_dict_manifest.json"


@pytest.fixture(scope="session")
def manifest() -> dict:
    return json.loads(MANIFEST.read_text())


@pytest.fixture(scope="session")
def detector():
    """`detector(name)`: a tiny-frame (64 px) detector for 1 object class, built on first use."""
    built = {}

    def get(name: str):
        if name not in built:
            torch.manual_seed(0)
            built[name] = build_detector(name, num_classes=2, min_size=64, max_size=64)
        return built[name]

    return get


@pytest.fixture(scope="session")
def random_batch():
    """`random_batch(seed)`: two 5x64x64 frames in [0, 1], three boxes (labels 1-based)."""
    return _random_batch


def _random_batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = [torch.rand(5, 64, 64, generator=generator) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 36.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0], [2.0, 30.0, 20.0, 60.0]]),
                "labels": torch.tensor([1, 1])}]
    return images, targets
