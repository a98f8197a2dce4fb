"""Epoch checkpoints are written on a thread from a snapshot, so training goes on meanwhile."""

import threading

import pytest
import torch

from crossdet_ray.engine.checkpoint import BackgroundWriter
from crossdet_ray.engine.run_logs import SeedLogWriter
from crossdet_ray.engine.storage import RunStorage
from crossdet_ray.engine.train import EpochMetrics


class GatedStorage(RunStorage):
    """Local storage whose torch saves wait until the test opens the gate."""

    def __init__(self, root):
        base = RunStorage.from_uri(str(root))
        super().__init__(base.filesystem, base.root)
        self.gate = threading.Event()
        self.saving = threading.Event()

    def save_torch(self, obj, relative):
        self.saving.set()
        assert self.gate.wait(timeout=30), "the test never opened the gate"
        super().save_torch(obj, relative)


def _metrics(epoch, loss=1.0, is_best=True):
    return EpochMetrics(epoch=epoch, avg_loss=loss, total_loss=loss, epoch_time_sec=1.0,
                        learning_rate=0.01, is_best=is_best, loss_classifier=loss,
                        loss_box_reg=0.0, loss_objectness=0.0, loss_rpn_box_reg=0.0,
                        images_per_sec=1.0, map=None, map50=None, map75=None,
                        eval_time_sec=0.0, peak_memory_mb=None, best_epoch=epoch,
                        best_loss=loss, timestamp="2026-01-01T00:00:00")


def _checkpoint(epoch, weight):
    return {"epoch": epoch, "backbone": "mit_b0", "model_state_dict": {"w": weight},
            "optimizer_state_dict": {"state": {0: {"momentum_buffer": weight * 2}},
                                     "param_groups": [{"lr": 0.01, "params": [0]}]},
            "scheduler_state_dict": {}, "loss": 1.0, "best_loss": 1.0, "best_epoch": epoch,
            "config": {}, "history": {"epoch_losses": [1.0], "epoch_times": [1.0]},
            "num_classes": 2}


def _writer(storage, start_epoch=1):
    writer = SeedLogWriter(storage, "mit_b0", {})
    writer.on_train_start({"num_classes": 2, "num_parameters": 1, "device": "cpu",
                           "train_images": 1, "test_images": 1, "start_epoch": start_epoch})
    return writer


def test_epoch_end_returns_while_the_checkpoint_is_still_being_written(tmp_path):
    storage = GatedStorage(tmp_path)
    writer = _writer(storage)
    weight = torch.ones(4)
    reported = []  # what the report (the trial reporter's tune.report) saw when it ran

    def report(path, entry):
        rows = (tmp_path / "logs" / "epoch_metrics.csv").read_text()
        reported.append((path, (tmp_path / path).is_file(), "epoch_001" in rows, entry["epoch"]))

    writer.on_epoch_end(_metrics(1), _checkpoint(1, weight), report=report)  # would block if synchronous
    assert storage.saving.wait(timeout=30)
    assert not list((tmp_path / "checkpoints").glob("epoch_001_*.pth"))
    assert reported == []  # not announced before the file is complete
    # No row yet either: a row promises that its epoch's checkpoint is safe.
    assert "epoch_001" not in (tmp_path / "logs" / "epoch_metrics.csv").read_text()
    # Training goes on and updates the live tensors in place...
    weight.add_(100.0)
    storage.gate.set()
    writer.wait_for_checkpoints()
    # ...but the file holds the epoch's values, and best_model.pth names the same file.
    [saved_path] = (tmp_path / "checkpoints").glob("epoch_001_*.pth")
    saved = torch.load(saved_path, weights_only=True)
    assert torch.equal(saved["model_state_dict"]["w"], torch.ones(4))
    assert torch.equal(saved["optimizer_state_dict"]["state"][0]["momentum_buffer"],
                       torch.full((4,), 2.0))
    assert (tmp_path / "checkpoints" / "best_model.pth").samefile(saved_path)
    # Announced with the file complete and before its row; the row follows the announcement.
    assert reported == [(writer.last_checkpoint, True, False, 1)]
    assert "epoch_001" in (tmp_path / "logs" / "epoch_metrics.csv").read_text()


def test_a_failed_background_write_stops_training_at_the_next_batch(tmp_path):
    class FullDisk(RunStorage):
        def save_torch(self, obj, relative):
            raise OSError(28, "No space left on device")

    base = RunStorage.from_uri(str(tmp_path))
    writer = _writer(FullDisk(base.filesystem, base.root))
    writer.on_epoch_end(_metrics(1), _checkpoint(1, torch.ones(2)))
    # The training loop polls should_stop before every batch: the failure surfaces there,
    # not an epoch later.
    with pytest.raises(OSError, match="No space left"):
        for _ in range(3000):
            writer.should_stop()
            threading.Event().wait(0.01)
    assert "epoch_001" not in (tmp_path / "logs" / "epoch_metrics.csv").read_text()


def test_partial_files_of_a_killed_write_are_removed_on_start(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "epoch_002_loss_0.5000.pth.tmp-0123abcd").write_bytes(b"half a file")
    (checkpoints / "epoch_001_loss_0.9000.pth").write_bytes(b"kept")
    _writer(RunStorage.from_uri(str(tmp_path)), start_epoch=2)  # resuming after epoch 1
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_001_loss_0.9000.pth"]


def test_background_writer_runs_writes_in_order():
    order = []
    writer = BackgroundWriter()
    for index in range(5):
        writer.submit(order.append, index)
    writer.close()
    assert order == [0, 1, 2, 3, 4]
