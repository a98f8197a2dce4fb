"""best_map_model.pth: the highest-test-mAP epoch's second name, beside the seed's lowest-loss
best_model.pth; and --init-from's weights (`TrainConfig.init_weights`) in the engine."""

from __future__ import annotations

import json
import os

import pytest
import torch

from crossdet_ray.engine.run_logs import SeedLogWriter
from crossdet_ray.engine.storage import RunStorage
from crossdet_ray.engine.train import EpochMetrics, best_map_of, fit

START_INFO = {"num_classes": 2, "num_parameters": 1, "device": "cpu", "train_images": 4,
              "test_images": 2}


def _epoch(epoch: int, loss: float, map_value: float | None, best: dict) -> tuple:
    """The metrics and checkpoint `fit` would hand the writer for one epoch; `best` carries
    the running bests, worked out here as the engine defines them."""
    is_best = loss < best.get("loss", float("inf"))
    if is_best:
        best.update(loss=loss, epoch=epoch)
    is_best_map = map_value is not None and map_value > best.get("map", -1.0)
    if is_best_map:
        best.update(map=map_value, map_epoch=epoch)
    metrics = EpochMetrics(
        epoch=epoch, avg_loss=loss, total_loss=loss * 2, epoch_time_sec=1.0,
        learning_rate=0.01, is_best=is_best, loss_classifier=0.0, loss_box_reg=0.0,
        loss_objectness=0.0, loss_rpn_box_reg=0.0, images_per_sec=1.0, map=map_value,
        map50=map_value, map75=map_value, eval_time_sec=0.1, peak_memory_mb=1.0,
        best_epoch=best["epoch"], best_loss=best["loss"], timestamp="t",
        is_best_map=is_best_map, best_map_epoch=best.get("map_epoch", 0),
        best_map=best.get("map"))
    checkpoint = {"epoch": epoch, "backbone": "mit_b0",
                  "model_state_dict": {"w": torch.full((3,), float(epoch))},
                  "optimizer_state_dict": {}, "scheduler_state_dict": {}, "loss": loss,
                  "best_loss": best["loss"], "best_epoch": best["epoch"], "config": {},
                  "history": {"epoch_losses": [loss], "epoch_times": [1.0]}}
    return metrics, checkpoint


def _write_epochs(storage, epochs, keep_checkpoints=None, start_epoch=1, best=None,
                  best_map_epoch=0):
    writer = SeedLogWriter(storage, "mit_b0", {}, keep_checkpoints=keep_checkpoints)
    writer.on_train_start({**START_INFO, "start_epoch": start_epoch,
                           "best_map_epoch": best_map_epoch})
    best = {} if best is None else best
    for epoch, loss, map_value in epochs:
        writer.on_epoch_end(*_epoch(epoch, loss, map_value, best))
    writer.wait_for_checkpoints()
    return writer, best


def _epoch_of(path) -> int:
    return int(torch.load(path, weights_only=True)["epoch"])


def test_best_map_file_is_the_highest_map_epoch_and_survives_pruning(tmp_path):
    storage = RunStorage.from_uri(str(tmp_path))
    # Loss falls every epoch (best_model.pth = epoch 4); mAP peaks at epoch 2 and ties there
    # at epoch 4 (a tie does not move it).
    _write_epochs(storage, [(1, 3.0, 0.1), (2, 2.0, 0.4), (3, 1.5, 0.2), (4, 1.0, 0.4)],
                  keep_checkpoints=1)
    checkpoints = tmp_path / "checkpoints"
    assert _epoch_of(checkpoints / "best_model.pth") == 4
    assert _epoch_of(checkpoints / "best_map_model.pth") == 2
    epoch_files = sorted(p.name for p in checkpoints.glob("epoch_*.pth"))
    assert epoch_files == ["epoch_004_loss_1.0000.pth"]  # epoch 2's own name was pruned
    info = json.loads((tmp_path / "logs" / "training_info.json").read_text())
    assert (info["best_epoch"], info["best_loss"]) == (4, 1.0)
    assert (info["best_map_epoch"], info["best_map"]) == (2, 0.4)
    assert info["best_map_model_path"].endswith("checkpoints/best_map_model.pth")
    rows = (tmp_path / "logs" / "epoch_metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert [r.split(",")[header.index("is_best_map")] for r in rows[1:]] == [
        "True", "True", "False", "False"]


def test_best_map_file_is_a_second_name_not_a_copy(tmp_path):
    storage = RunStorage.from_uri(str(tmp_path))
    _write_epochs(storage, [(1, 3.0, 0.1), (2, 2.0, 0.3)])
    checkpoints = tmp_path / "checkpoints"
    assert os.path.samefile(checkpoints / "best_map_model.pth",
                            checkpoints / "epoch_002_loss_2.0000.pth")


def test_resume_points_best_map_back_at_the_resumed_epochs_best(tmp_path):
    """A crash after epoch 3 became best_map_model.pth but before it was logged: the resume
    from epoch 2 (best mAP at epoch 2) gives the name back to epoch 2's file."""
    storage = RunStorage.from_uri(str(tmp_path))
    _write_epochs(storage, [(1, 3.0, 0.1), (2, 2.0, 0.3), (3, 1.0, 0.9)])
    checkpoints = tmp_path / "checkpoints"
    assert _epoch_of(checkpoints / "best_map_model.pth") == 3
    writer = SeedLogWriter(storage, "mit_b0", {})
    writer.on_train_start({**START_INFO, "start_epoch": 3, "best_map_epoch": 2})
    assert _epoch_of(checkpoints / "best_map_model.pth") == 2
    # A restart from scratch: no epoch is safe, so no best_map_model.pth either.
    SeedLogWriter(storage, "mit_b0", {}).on_train_start({**START_INFO, "start_epoch": 1})
    assert not (checkpoints / "best_map_model.pth").exists()


def test_no_evaluation_no_best_map_file(tmp_path):
    storage = RunStorage.from_uri(str(tmp_path))
    _write_epochs(storage, [(1, 3.0, None), (2, 2.0, None)])
    assert not (tmp_path / "checkpoints" / "best_map_model.pth").exists()
    info = json.loads((tmp_path / "logs" / "training_info.json").read_text())
    assert (info["best_map_epoch"], info["best_map"]) == (0, None)


def test_best_map_of_history():
    assert best_map_of([]) == (0, None)
    assert best_map_of([None, 0.2, 0.5, 0.5, 0.1]) == (3, 0.5)


# -- the engine: best mAP tracked by fit, and init_weights ----------------------------------
class _Last:
    """A listener keeping the epochs' metrics and the last checkpoint's weights."""

    def __init__(self):
        self.epochs, self.weights, self.info, self.summary = [], None, None, None

    def on_train_start(self, info):
        self.info = info

    def on_batch_end(self, metrics):
        pass

    def on_epoch_end(self, metrics, checkpoint):
        self.epochs.append(metrics)
        self.weights = {k: v.detach().clone() for k, v in checkpoint["model_state_dict"].items()}

    def on_train_end(self, summary, checkpoint):
        self.summary = summary


def _max_difference(a: dict, b: dict) -> float:
    """Over the learned weights; BatchNorm's running statistics move even at lr 0."""
    learned = [k for k in a if "running_" not in k and "num_batches_tracked" not in k]
    return max(float((a[k] - b[k]).abs().max()) for k in learned)


@pytest.fixture(scope="module")
def source(two_epoch_fit, tmp_path_factory):
    """The engine's two-epoch fit (tests/engine/conftest.py), its last checkpoint saved as a
    file: (config, its Recorder, the file)."""
    config, recorder, _ = two_epoch_fit
    path = tmp_path_factory.mktemp("init_source") / "best_map_model.pth"
    torch.save(recorder.checkpoints[-1], path)
    return config, recorder, path


def test_fit_tracks_the_best_map_epoch(source):
    _, listener, _ = source
    maps = [m.map for m in listener.epochs]
    expected_epoch, expected = best_map_of(maps)
    assert [m.is_best_map for m in listener.epochs] == [True, maps[1] > maps[0]]
    assert (listener.epochs[-1].best_map_epoch, listener.epochs[-1].best_map) == (
        expected_epoch, expected)
    summary = listener.summary
    assert (summary.best_map_epoch, summary.best_map) == (expected_epoch, expected)
    assert summary.best_map50 == listener.epochs[expected_epoch - 1].map50


def test_init_weights_start_training_from_the_source_weights(source):
    """With a vanishing lr one epoch leaves the weights where they started: the source's
    with init_weights, the seed's fresh ones without."""
    config, listener, path = source
    still = config.replace(epochs=1, lr=1e-12, evaluate_every_epoch=False)
    initialised, fresh = _Last(), _Last()
    fit(still.replace(init_weights=str(path)), "test_mit", config.data, listener=initialised)
    fit(still, "test_mit", config.data, listener=fresh)
    assert _max_difference(initialised.weights, listener.weights) < 1e-6
    assert _max_difference(fresh.weights, listener.weights) > 1e-3
    assert initialised.info["init_from"] == {"path": str(path), "epoch": 2}
    assert fresh.info["init_from"] is None


def test_resume_wins_over_init_weights(source, tmp_path):
    """A trial resuming its own checkpoint continues from it, not from --init-from's."""
    config, _, path = source
    # The init file does not exist: reading it would raise CheckpointError.
    missing = tmp_path / "other.pth"
    checkpoint = torch.load(path, weights_only=True)
    resumed = _Last()
    fit(config.replace(epochs=3, evaluate_every_epoch=False, init_weights=str(missing)),
        "test_mit", config.data, listener=resumed, resume_from=checkpoint)
    assert [m.epoch for m in resumed.epochs] == [3]
    assert resumed.info["init_from"] == {"path": str(missing), "epoch": None}


def test_init_weights_of_another_backbone_is_refused(source):
    from crossdet_ray.engine.checkpoint import CheckpointError

    config, _, path = source
    with pytest.raises(CheckpointError, match="holds test_mit, not mit_b1"):
        fit(config.replace(epochs=1, init_weights=str(path)), "mit_b1", config.data)
