"""The GPU checks: every test in this folder needs CUDA and is skipped, with the reason, without it.

Run them on a CUDA machine with `.venv/bin/python -m pytest tests/gpu -q` (README: "Checks on a
GPU"). They are marked `gpu`, so `-m "not gpu"` leaves them out of a CPU run's report.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
NO_CUDA_REASON = ("no CUDA GPU (torch.cuda.is_available() is False): the GPU checks run on a "
                  "CUDA machine with `.venv/bin/python -m pytest tests/gpu -q`")


def pytest_collection_modifyitems(config, items):
    # This hook sees every collected item, not only this folder's: pick ours by path. A skip
    # marker (not a skipping fixture) skips before the session-scoped dataset is generated.
    cuda = torch.cuda.is_available()
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not cuda:
                item.add_marker(pytest.mark.skip(reason=NO_CUDA_REASON))


@pytest.fixture
def cuda():
    return torch.device("cuda")


@pytest.fixture
def gpu_train_config(tiny_dataset):
    """One epoch on the session's tiny 64x64 dataset, with the product's CUDA defaults."""
    from crossdet_ray.config import TrainConfig

    return TrainConfig(data=tiny_dataset, epochs=1, batch_size=2, num_workers=0,
                       min_size=64, max_size=64, seed=0, device="cuda")
