"""The promise of the run files, at the engine: a log row means its epoch is safe.

A crash is injected between the steps of an epoch's commit (file, announcement, rows, pruning)
and the files are then read as a restarted trial reads them (`find_resume_point`).
"""

import csv

import pytest
import torch

from crossdet_ray.engine.checkpoint import CheckpointError
from crossdet_ray.engine.run_logs import (
    SeedLogWriter,
    find_resume_point,
    restore_announced_epoch,
)
from crossdet_ray.engine.storage import RunStorage
from crossdet_ray.engine.train import BatchMetrics, EpochMetrics


class Crash(Exception):
    """Stands for the process dying at the injected point."""


def _metrics(epoch, loss):
    return EpochMetrics(epoch=epoch, avg_loss=loss, total_loss=loss, epoch_time_sec=1.0,
                        learning_rate=0.01, is_best=True, loss_classifier=loss,
                        loss_box_reg=0.0, loss_objectness=0.0, loss_rpn_box_reg=0.0,
                        images_per_sec=1.0, map=None, map50=None, map75=None,
                        eval_time_sec=0.0, peak_memory_mb=1.0, best_epoch=epoch,
                        best_loss=loss, timestamp="2026-01-01T00:00:00")


def _batch(epoch, batch):
    return BatchMetrics(epoch=epoch, batch=batch, loss=1.0, loss_classifier=1.0,
                        loss_box_reg=0.0, loss_objectness=0.0, loss_rpn_box_reg=0.0,
                        timestamp="2026-01-01T00:00:00", batch_time_sec=0.1)


def _checkpoint(epoch):
    return {"epoch": epoch, "backbone": "mit_b0",
            "model_state_dict": {"w": torch.full((4,), float(epoch))},
            "optimizer_state_dict": {"state": {}, "param_groups": []},
            "scheduler_state_dict": {}, "loss": 1.0 / epoch, "best_loss": 1.0 / epoch,
            "best_epoch": epoch, "config": {},
            "history": {"epoch_losses": [1.0] * epoch, "epoch_times": [1.0] * epoch},
            "num_classes": 2}


def _start(storage, start_epoch=1, keep=None, recovered=None):
    writer = SeedLogWriter(storage, "mit_b0", {}, keep_checkpoints=keep,
                           recovered_entry=recovered)
    writer.on_train_start({"num_classes": 2, "num_parameters": 1, "device": "cpu",
                           "train_images": 1, "test_images": 1, "start_epoch": start_epoch})
    return writer


def _train_epoch(writer, epoch, report=None, batches=2):
    for batch in range(1, batches + 1):
        writer.on_batch_end(_batch(epoch, batch))
    writer.on_epoch_end(_metrics(epoch, 1.0 / epoch), _checkpoint(epoch), report=report)


def _epochs(path):
    with open(path) as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def _batches(path):
    with open(path) as handle:
        return [(int(r["epoch"]), int(r["batch"])) for r in csv.DictReader(handle)]


def test_a_crash_between_write_and_report_keeps_the_file_tune_points_at(tmp_path):
    """--keep-checkpoints 1: the old file goes only after the new one is announced and logged."""
    storage = RunStorage.from_uri(str(tmp_path))
    announced = []
    writer = _start(storage, keep=1)
    _train_epoch(writer, 1, report=lambda path, entry: announced.append((path, entry)))
    writer.wait_for_checkpoints()

    def crash(path, entry):
        raise Crash("the process died after epoch 2's file, before its report")

    _train_epoch(writer, 2, report=crash)
    with pytest.raises(Crash):
        writer.wait_for_checkpoints()
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # Epoch 1's file, the one Tune points at, is still there; epoch 2's row never appeared.
    assert any(name.startswith("epoch_001_") for name in files), files
    assert _epochs(tmp_path / "logs" / "epoch_metrics.csv") == [1]
    assert _batches(tmp_path / "logs" / "batch_metrics.csv") == [(1, 1), (1, 2)]

    # The restarted trial continues after epoch 1: epoch 2 was never announced, so its file
    # is not trusted, and is removed when the attempt starts.
    resume = find_resume_point(storage, {"epoch": 1, **announced[0][1]})
    assert resume.epoch == 1 and torch.equal(resume.checkpoint["model_state_dict"]["w"],
                                             torch.full((4,), 1.0))
    again = _start(storage, start_epoch=2, keep=1)
    assert not list((tmp_path / "checkpoints").glob("epoch_002_*"))
    _train_epoch(again, 2)
    _train_epoch(again, 3)
    again.wait_for_checkpoints()
    assert _epochs(tmp_path / "logs" / "epoch_metrics.csv") == [1, 2, 3]
    assert _batches(tmp_path / "logs" / "batch_metrics.csv") == [
        (e, b) for e in (1, 2, 3) for b in (1, 2)]
    epoch_files = [p.name for p in (tmp_path / "checkpoints").glob("epoch_*")]
    assert len(epoch_files) == 1 and epoch_files[0].startswith("epoch_003_")


def test_an_epoch_announced_but_not_logged_is_resumed_after_with_its_rows_restored(tmp_path):
    storage = RunStorage.from_uri(str(tmp_path))
    entries = {}

    def announce_then_die_on_epoch_2(path, entry):
        entries[entry["epoch"]] = entry
        if entry["epoch"] == 2:
            raise Crash("died after Tune took epoch 2, before writing its rows")

    writer = _start(storage)
    _train_epoch(writer, 1, report=announce_then_die_on_epoch_2)
    _train_epoch(writer, 2, report=announce_then_die_on_epoch_2)
    with pytest.raises(Crash):
        writer.wait_for_checkpoints()
    assert _epochs(tmp_path / "logs" / "epoch_metrics.csv") == [1]

    announced = {"epoch": 2, "log": entries[2]}
    resume = find_resume_point(storage, announced)
    assert resume.epoch == 2 and resume.log_entry == entries[2]
    _start(storage, start_epoch=3, recovered=resume.log_entry)
    assert _epochs(tmp_path / "logs" / "epoch_metrics.csv") == [1, 2]
    assert _batches(tmp_path / "logs" / "batch_metrics.csv") == [(1, 1), (1, 2), (2, 1), (2, 2)]
    # Restoring is idempotent: the rows are there once.
    assert not restore_announced_epoch(storage, announced)
    assert _epochs(tmp_path / "logs" / "epoch_metrics.csv") == [1, 2]


def test_the_driver_restores_the_rows_of_a_trial_stopped_right_after_its_report(tmp_path):
    storage = RunStorage.from_uri(str(tmp_path))
    entries = {}
    writer = _start(storage)
    _train_epoch(writer, 1, report=lambda path, entry: entries.setdefault(1, entry))

    def stopped_by_tune(path, entry):
        entries[2] = entry
        raise Crash("killed before the rows")

    _train_epoch(writer, 2, report=stopped_by_tune)
    with pytest.raises(Crash):
        writer.wait_for_checkpoints()
    assert restore_announced_epoch(storage, {"epoch": 2, "log": entries[2]})
    assert _epochs(tmp_path / "logs" / "epoch_metrics.csv") == [1, 2]
    assert _batches(tmp_path / "logs" / "batch_metrics.csv")[-2:] == [(2, 1), (2, 2)]


def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    storage = RunStorage.from_uri(str(tmp_path))
    writer = _start(storage)
    for epoch in (1, 2, 3):
        _train_epoch(writer, epoch)
    writer.wait_for_checkpoints()
    [newest] = (tmp_path / "checkpoints").glob("epoch_003_*")
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    resume = find_resume_point(storage)
    assert resume.epoch == 2
    assert resume.unreadable == [str(newest)]
    assert str(newest) in caplog.text and "older epoch" in caplog.text
    # The attempt that continues after epoch 2 replaces epoch 3's rows instead of adding some.
    again = _start(storage, start_epoch=3)
    _train_epoch(again, 3)
    again.wait_for_checkpoints()
    assert _epochs(tmp_path / "logs" / "epoch_metrics.csv") == [1, 2, 3]
    assert _batches(tmp_path / "logs" / "batch_metrics.csv") == [
        (e, b) for e in (1, 2, 3) for b in (1, 2)]


def test_when_no_checkpoint_loads_one_error_names_them_all(tmp_path):
    storage = RunStorage.from_uri(str(tmp_path))
    writer = _start(storage)
    for epoch in (1, 2):
        _train_epoch(writer, epoch)
    writer.wait_for_checkpoints()
    for path in (tmp_path / "checkpoints").glob("epoch_*"):
        path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as caught:
        find_resume_point(storage)
    message = str(caught.value)
    assert "\n" not in message
    for path in (tmp_path / "checkpoints").glob("epoch_*"):
        assert str(path) in message


def test_an_epoch_file_written_but_never_announced_or_logged_is_not_trusted(tmp_path):
    storage = RunStorage.from_uri(str(tmp_path))
    writer = _start(storage)
    _train_epoch(writer, 1)
    writer.wait_for_checkpoints()
    # Epoch 2's file landed, then the process died before its report and rows.
    storage.save_torch(_checkpoint(2), "checkpoints/epoch_002_loss_0.5000.pth")
    assert find_resume_point(storage).epoch == 1


def test_final_files_hold_copies_not_the_live_tensors(tmp_path):
    """Saved from a snapshot (CPU copies), so a GPU run's final files load without a GPU."""
    storage = RunStorage.from_uri(str(tmp_path))
    writer = _start(storage)
    live = _checkpoint(1)
    _train_epoch(writer, 1)
    saved_tensors = []
    original_save = storage.save_torch

    def record(obj, relative):
        saved_tensors.append(obj["w"] if "w" in obj else obj["model_state_dict"]["w"])
        original_save(obj, relative)

    storage.save_torch = record
    from crossdet_ray.engine.train import TrainingSummary

    summary = TrainingSummary(backbone="mit_b0", num_classes=2, num_parameters=1, device="cpu",
                              epochs_completed=1, best_epoch=1, best_loss=1.0, final_loss=1.0,
                              map=None, map50=None, map75=None, train_images_per_sec=1.0,
                              infer_ms_per_image=1.0, fps=1.0, total_time_sec=1.0)
    writer.on_train_end(summary, {**live, "epoch": 0})  # not the last epoch's: a new file
    assert saved_tensors and all(t.device.type == "cpu" for t in saved_tensors)
    assert all(t.data_ptr() != live["model_state_dict"]["w"].data_ptr() for t in saved_tensors)
    final = torch.load(tmp_path / "checkpoints" / "mit_b0_final.pth", map_location=None,
                       weights_only=True)
    assert torch.equal(final["w"], live["model_state_dict"]["w"])


def test_a_kill_between_the_two_csv_writes_loses_no_batch_row_and_repeats_none(tmp_path):
    """Batch rows are written before the epoch row that marks them safe."""
    storage = RunStorage.from_uri(str(tmp_path))
    entries = {}
    writer = _start(storage)
    _train_epoch(writer, 1)
    writer.wait_for_checkpoints()

    def die_before_the_epoch_row(relative, text, original=storage.write_text):
        if relative.endswith("epoch_metrics.csv") and "\n2," in text:
            raise Crash("killed between batch_metrics.csv and epoch_metrics.csv")
        original(relative, text)

    storage.write_text = die_before_the_epoch_row
    _train_epoch(writer, 2, report=lambda path, entry: entries.setdefault(2, entry))
    with pytest.raises(Crash):
        writer.wait_for_checkpoints()
    del storage.write_text
    assert _epochs(tmp_path / "logs" / "epoch_metrics.csv") == [1]
    assert _batches(tmp_path / "logs" / "batch_metrics.csv")[-2:] == [(2, 1), (2, 2)]

    resume = find_resume_point(storage, {"epoch": 2, "log": entries[2]})
    _start(storage, start_epoch=3, recovered=resume.log_entry)
    assert _epochs(tmp_path / "logs" / "epoch_metrics.csv") == [1, 2]
    assert _batches(tmp_path / "logs" / "batch_metrics.csv") == [(1, 1), (1, 2), (2, 1), (2, 2)]
