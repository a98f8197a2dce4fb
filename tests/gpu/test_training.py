"""Training on CUDA through the engine's `fit`: every backbone with the GPU switches, the
compiled encoder, and checkpoints written on the GPU read back on a machine without one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crossdet_ray.config import BACKBONES
from crossdet_ray.engine.run_logs import SeedLogWriter
from crossdet_ray.engine.storage import RunStorage
from crossdet_ray.engine.train import LOSS_COMPONENTS, fit

from ..tune.helpers import batch_rows, epoch_rows, training_info

ROOT = Path(__file__).resolve().parents[2]


def _fit_with_logs(config, backbone, data_dir, trial_dir: Path):
    writer = SeedLogWriter(RunStorage.from_uri(str(trial_dir)), backbone, config.to_dict())
    return fit(config, backbone, data_dir, listener=writer)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_epoch_and_evaluation_with_bf16_checkpointing_and_channels_last(
        backbone, gpu_train_config, tiny_dataset, tmp_path):
    config = gpu_train_config.replace(amp="auto", activation_checkpointing="on",
                                      channels_last="on")
    summary = _fit_with_logs(config, backbone, tiny_dataset, tmp_path / backbone)

    assert summary.device == "cuda"
    assert summary.epochs_completed == 1
    info = training_info(tmp_path / backbone)
    assert info["status"] == "completed"
    assert info["device"] == "cuda"
    assert info["amp_bf16"] is True, "amp auto must mean bf16 on CUDA"
    assert info["activation_checkpointing"] is True

    rows = epoch_rows(tmp_path / backbone)
    assert [row["epoch"] for row in rows] == ["1"]
    row = rows[0]
    for column in ("avg_loss", *LOSS_COMPONENTS):
        assert math.isfinite(float(row[column])), f"{column} = {row[column]}"
    assert row["map"] != "", "the epoch was not evaluated"
    assert 0.0 <= float(row["map"]) <= 1.0
    assert 0.0 <= float(row["map50"]) <= 1.0
    assert float(row["peak_memory_mb"]) > 0  # torch.cuda.max_memory_allocated, not the RSS
    batches = batch_rows(tmp_path / backbone)
    assert batches and all(math.isfinite(float(b["loss"])) for b in batches)


def test_compiled_encoder_trains_an_epoch(gpu_train_config, tiny_dataset):
    import torch._dynamo
    from torch._dynamo.utils import counters

    # Until session 3 `--compile` silently did nothing (the backbone called around the compiled
    # wrapper); dynamo's graph count shows the encoder really went through the compiler.
    torch._dynamo.reset()
    counters.clear()
    summary = fit(gpu_train_config.replace(compile=True), "mit_b0", tiny_dataset)

    assert summary.device == "cuda"
    assert summary.epochs_completed == 1
    assert math.isfinite(summary.final_loss)
    assert counters["stats"]["unique_graphs"] >= 1, "torch.compile captured no graph"


LOAD_EVERY_FILE_ON_THE_CPU = """
import json, sys, torch
paths = sys.argv[1:]
failures = {}
for path in paths:
    try:
        torch.load(path, map_location=None, weights_only=True)
    except Exception as error:
        failures[path] = f"{type(error).__name__}: {error}".splitlines()[0]
print(json.dumps({"cuda": torch.cuda.is_available(), "failures": failures}))
"""


def test_checkpoints_written_on_the_gpu_load_on_a_cpu_machine(gpu_train_config, tiny_dataset,
                                                              tmp_path):
    trial_dir = tmp_path / "mit_b0"
    summary = _fit_with_logs(gpu_train_config, "mit_b0", tiny_dataset, trial_dir)
    assert summary.device == "cuda"
    written = sorted(str(p) for p in trial_dir.rglob("*.pth"))
    names = {Path(p).name for p in written}
    assert {"best_model.pth", "mit_b0_final.pth", "mit_b0_final_complete.pth"} <= names
    assert any(name.startswith("epoch_001_") for name in names)

    # A user without a GPU loads with the README's plain call: no map_location.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", LOAD_EVERY_FILE_ON_THE_CPU, *written],
                            capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["cuda"] is False, "the loading process could still see a GPU"
    assert report["failures"] == {}, "files that do not load without a GPU: " + json.dumps(
        report["failures"], indent=2)
