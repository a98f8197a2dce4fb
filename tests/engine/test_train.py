import copy
import csv
import json
import logging
import math

import pytest
import torch

from crossdet_ray.engine import train as train_module
from crossdet_ray.engine.checkpoint import CHECKPOINT_KEYS, CheckpointError, load_checkpoint
from crossdet_ray.engine.run_logs import EPOCH_COLUMNS, SeedLogWriter
from crossdet_ray.engine.storage import RunStorage
from crossdet_ray.engine.train import NonFiniteLossError, fit, select_device

from .conftest import Recorder

SEED_EPOCH_COLUMNS = ["epoch", "avg_loss", "total_loss", "epoch_time_sec", "learning_rate",
                      "is_best", "checkpoint_path", "timestamp"]
SEED_BATCH_COLUMNS = ["epoch", "batch", "loss", "loss_classifier", "loss_box_reg",
                      "loss_objectness", "loss_rpn_box_reg", "timestamp"]


def test_fit_reports_every_metric(two_epoch_fit):
    config, recorder, summary = two_epoch_fit
    assert [m.epoch for m in recorder.epochs] == [1, 2]
    first = recorder.epochs[0]
    for name in ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"):
        assert math.isfinite(getattr(first, name))
    assert first.avg_loss == pytest.approx(first.total_loss / len(
        [b for b in recorder.batches if b.epoch == 1]))
    assert first.images_per_sec > 0 and first.epoch_time_sec > 0
    assert 0.0 <= first.map <= 1.0 and 0.0 <= first.map50 <= 1.0 and 0.0 <= first.map75 <= 1.0
    # StepLR: step 1, gamma 0.5, so epoch 2 trains at half the LR.
    assert [m.learning_rate for m in recorder.epochs] == pytest.approx([0.005, 0.0025])
    assert summary.epochs_completed == 2
    # The default device is "auto": CUDA where torch sees it, else the CPU.
    assert summary.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert summary.infer_ms_per_image > 0 and summary.fps > 0
    assert recorder.info["num_classes"] == 2


def test_checkpoint_is_the_reference_dict_and_loads_weights_only(two_epoch_fit, tmp_path):
    _, recorder, _ = two_epoch_fit
    checkpoint = recorder.checkpoints[-1]
    assert set(CHECKPOINT_KEYS) <= set(checkpoint)
    assert isinstance(checkpoint["config"], dict)
    path = tmp_path / "c.pth"
    torch.save(checkpoint, path)
    loaded = load_checkpoint(path)  # weights_only=True inside
    assert loaded["epoch"] == 2 and loaded["backbone"] == "test_mit"
    assert loaded["config"]["lr"] == 0.005


def test_resumed_run_matches_uninterrupted_run(two_epoch_fit):
    config, recorder, _ = two_epoch_fit
    first_epoch_checkpoint = recorder.checkpoints[0]
    resumed = Recorder()
    summary = fit(config, "test_mit", config.data, listener=resumed,
                  resume_from=first_epoch_checkpoint)
    assert [m.epoch for m in resumed.epochs] == [2]
    assert resumed.epochs[0].avg_loss == pytest.approx(recorder.epochs[1].avg_loss, rel=1e-5)
    assert resumed.epochs[0].learning_rate == pytest.approx(0.0025)
    # The run's time counts the first attempt's epoch as well as this attempt.
    first_attempt_sec = first_epoch_checkpoint["history"]["elapsed_sec"][-1]
    elapsed = summary.history["elapsed_sec"]
    assert len(elapsed) == 2 and elapsed[0] == first_attempt_sec < elapsed[1]
    assert summary.total_time_sec >= first_attempt_sec + resumed.epochs[0].epoch_time_sec


def test_resume_checkpoint_of_other_backbone_is_refused(two_epoch_fit):
    config, recorder, _ = two_epoch_fit
    with pytest.raises(ValueError, match="test_mit, not mit_b1"):
        fit(config, "mit_b1", config.data, resume_from=recorder.checkpoints[0])


def test_non_finite_loss_names_epoch_and_batch(tiny_train_config, monkeypatch):
    class Diverged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))

        def forward(self, images, targets=None):
            nan = self.weight * float("nan")
            return {k: nan for k in ("loss_classifier", "loss_box_reg", "loss_objectness",
                                     "loss_rpn_box_reg")}

    monkeypatch.setattr(train_module, "build_model", lambda *a, **k: Diverged())
    monkeypatch.setattr(train_module, "count_parameters", lambda m: 1)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, batch 1"):
        fit(tiny_train_config, "test_mit", tiny_train_config.data)


@pytest.mark.cpu_only  # the fallback cannot happen where CUDA sees a GPU
def test_cuda_request_without_cuda_falls_back_loudly(caplog):
    with caplog.at_level(logging.WARNING):
        assert select_device("cuda").type == "cpu"
    assert "CUDA sees no GPU" in caplog.text
    assert select_device("auto").type == "cpu"


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")
    weights_only = tmp_path / "weights.pth"
    torch.save({"a": torch.zeros(1)}, weights_only)
    with pytest.raises(CheckpointError, match="model_state_dict"):
        load_checkpoint(weights_only)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(garbage)


def _rows(path):
    with open(path) as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def test_seed_layout_written_by_log_writer(two_epoch_fit, tmp_path):
    config, recorder, summary = two_epoch_fit
    writer = SeedLogWriter(RunStorage.from_uri(str(tmp_path)), "test_mit", config.to_dict(),
                           keep_checkpoints=1)
    writer.on_train_start({**recorder.info, "start_epoch": 1})
    for batch in recorder.batches:
        writer.on_batch_end(batch)
    for metrics, checkpoint in zip(recorder.epochs, recorder.checkpoints):
        writer.on_epoch_end(metrics, checkpoint)
    writer.on_train_end(summary, recorder.checkpoints[-1])

    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    epoch2 = f"epoch_002_loss_{recorder.epochs[1].avg_loss:.4f}.pth"
    # keep_checkpoints=1: only the newest epoch file, plus the two bests and final.
    assert checkpoints == sorted([epoch2, "best_model.pth", "best_map_model.pth",
                                  "test_mit_final.pth", "test_mit_final_complete.pth"])
    assert not list(tmp_path.rglob("*.tmp-*"))
    final = torch.load(tmp_path / "checkpoints" / "test_mit_final.pth", weights_only=True)
    assert "backbone.encoder.patch_embed1.proj.weight" in final
    fields, epoch_rows = _rows(tmp_path / "logs" / "epoch_metrics.csv")
    assert fields[: len(SEED_EPOCH_COLUMNS)] == SEED_EPOCH_COLUMNS
    assert list(fields) == list(EPOCH_COLUMNS)
    assert [r["epoch"] for r in epoch_rows] == ["1", "2"]
    fields, batch_rows = _rows(tmp_path / "logs" / "batch_metrics.csv")
    assert fields[: len(SEED_BATCH_COLUMNS)] == SEED_BATCH_COLUMNS
    assert len(batch_rows) == len(recorder.batches)
    info = json.loads((tmp_path / "logs" / "training_info.json").read_text())
    assert info["status"] == "completed" and info["backbone"] == "test_mit"
    assert info["model_parameters"] == summary.num_parameters
    assert len(info["epoch_losses"]) == 2 and len(info["epoch_times"]) == 2
    assert info["final_model_path"].endswith("test_mit_final.pth")

    # A resumed attempt from epoch 1 drops the rows and files the dead attempt wrote after it.
    again = SeedLogWriter(RunStorage.from_uri(str(tmp_path)), "test_mit", config.to_dict())
    again.on_train_start({**recorder.info, "start_epoch": 2})
    _, epoch_rows = _rows(tmp_path / "logs" / "epoch_metrics.csv")
    assert [r["epoch"] for r in epoch_rows] == ["1"]
    assert not (tmp_path / "checkpoints" / epoch2).exists()


def test_optimizer_is_fused_sgd_with_the_plain_update():
    """The fused SGD step makes the reference's update (weight decay, momentum, lr, StepLR)."""
    from crossdet_ray.config import TrainConfig
    from crossdet_ray.engine.train import build_optimizer

    torch.manual_seed(0)
    fused_model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                      torch.nn.Linear(16, 2))
    plain_model = copy.deepcopy(fused_model)
    initial = copy.deepcopy(fused_model)
    config = TrainConfig(lr=0.1)
    fused_optimizer, _ = build_optimizer(config, fused_model)
    plain_optimizer, _ = build_optimizer(config, plain_model, fused=False)
    assert fused_optimizer.param_groups[0]["fused"] and not plain_optimizer.param_groups[0]["fused"]
    for step in range(3):
        batch = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        for model, optimizer in ((fused_model, fused_optimizer), (plain_model, plain_optimizer)):
            optimizer.zero_grad()
            model(batch).square().sum().backward()
            optimizer.step()
    for fused, plain in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(fused_model[0].weight, initial[0].weight)  # it did train
