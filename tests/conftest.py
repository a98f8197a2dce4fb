"""Shared fixtures: a tiny synthetic RGB-thermal-event dataset made once per session."""

from __future__ import annotations

import os

import pytest

# Tests must not oversubscribe CI's two cores (Ray trials run side by side).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """12 frames of 64x64 px: about 9 train and 3 test frames."""
    from crossdet_ray.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("tiny_data")
    generate_dataset(out, 12, seed=0, sizes=[(64, 64)])
    return str(out)


@pytest.fixture
def tiny_train_config(tiny_dataset):
    from crossdet_ray.config import TrainConfig

    return TrainConfig(data=tiny_dataset, epochs=2, batch_size=2, lr=0.005, num_workers=0,
                       backbones=["mit_b0"], min_size=64, max_size=64, seed=0)
