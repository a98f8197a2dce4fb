"""The reference's per-backbone files: CSV logs, training_info.json and its checkpoints.

Layout under one backbone's directory (the seed's, unchanged):
    checkpoints/epoch_XXX_loss_Y.YYYY.pth, best_model.pth, <backbone>_final.pth,
    <backbone>_final_complete.pth
    logs/epoch_metrics.csv, logs/batch_metrics.csv, logs/training_info.json
Every file goes through `RunStorage`, so it is written atomically, locally or to a cloud bucket.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import time
from typing import Any, Callable

from crossdet_ray.engine.checkpoint import BackgroundWriter, epoch_checkpoint_name, snapshot
from crossdet_ray.engine.storage import RunStorage
from crossdet_ray.engine.train import BatchMetrics, EpochMetrics, TrainingSummary

logger = logging.getLogger(__name__)

# The seed's columns come first, in its order; our extras follow.
EPOCH_COLUMNS = (
    "epoch", "avg_loss", "total_loss", "epoch_time_sec", "learning_rate", "is_best",
    "checkpoint_path", "timestamp",
    "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg",
    "images_per_sec", "map", "map50", "map75", "eval_time_sec", "peak_memory_mb",
)
BATCH_COLUMNS = (
    "epoch", "batch", "loss", "loss_classifier", "loss_box_reg", "loss_objectness",
    "loss_rpn_box_reg", "timestamp", "batch_time_sec",
)
EPOCH_FILE = re.compile(r"^epoch_(\d{3,})_loss_.*\.pth$")
PARTIAL_FILE = re.compile(r"\.tmp-[0-9a-f]{8}$")  # RunStorage's temporary names


def _csv_text(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _read_csv(storage: RunStorage, relative: str) -> list[dict[str, str]]:
    if not storage.exists(relative):
        return []
    return list(csv.DictReader(io.StringIO(storage.read_text(relative))))


def _json_safe(value: Any) -> Any:
    """NaN and infinity are not JSON; write null so pandas and jq read the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def dumps_json(value: Any) -> str:
    return json.dumps(_json_safe(value), indent=2, default=str)


class SeedLogWriter:
    """Writes one backbone's files in the seed's layout; a `TrainingListener`.

    An epoch's checkpoint is copied (cheap) and written to storage on a thread while the next
    epoch trains; `last_checkpoint` may then name a file still being written, and
    `wait_for_checkpoints` is where it is certainly complete.
    """

    def __init__(self, storage: RunStorage, backbone: str, config: dict[str, Any],
                 keep_checkpoints: int | None = None, extra_info: dict[str, Any] | None = None):
        self.storage = storage
        self._checkpoint_writes = BackgroundWriter()
        self.backbone = backbone
        self.config = config
        self.keep_checkpoints = keep_checkpoints
        self.info: dict[str, Any] = {
            "backbone": backbone, "status": "running", "config": config,
            **(extra_info or {}),
        }
        self.epoch_rows: list[dict[str, Any]] = []
        self.batch_rows: list[dict[str, Any]] = []
        self.last_checkpoint: str | None = None  # relative path of the newest epoch checkpoint
        self._last_epoch = 0

    # -- listener interface -------------------------------------------------------------
    def on_train_start(self, info: dict[str, Any]) -> None:
        start_epoch = int(info.get("start_epoch", 1))
        # A resumed run continues these files; rows past the checkpoint it resumes from were
        # written by an attempt that died before its checkpoint counted, so they go.
        self.epoch_rows = [r for r in _read_csv(self.storage, "logs/epoch_metrics.csv")
                           if int(r["epoch"]) < start_epoch]
        self.batch_rows = [r for r in _read_csv(self.storage, "logs/batch_metrics.csv")
                           if int(r["epoch"]) < start_epoch]
        self.info.update({
            "num_classes": info["num_classes"], "model_parameters": info["num_parameters"],
            "device": info["device"], "train_images": info["train_images"],
            "test_images": info["test_images"], "amp_bf16": info.get("amp_bf16"),
            "activation_checkpointing": info.get("activation_checkpointing"),
            # Epoch seconds, to see when trials ran side by side: fit() entered (data, model
            # build), then its first epoch about to start.
            "fit_started_at": info.get("started_at"),
            "train_started_at": time.time(),
        })
        if start_epoch > 1:
            self.info.setdefault("resumed_at_epochs", []).append(start_epoch)
        for name in self.storage.list_files("checkpoints"):
            match = EPOCH_FILE.match(name)
            # Epochs past the resume point, and temporaries of a write a crash cut short.
            if (match and int(match.group(1)) >= start_epoch) or PARTIAL_FILE.search(name):
                self.storage.delete(f"checkpoints/{name}")
        self._write_csvs()
        self._write_info()

    def on_batch_end(self, metrics: BatchMetrics) -> None:
        self.batch_rows.append(vars(metrics).copy())

    def on_epoch_end(self, metrics: EpochMetrics, checkpoint: dict[str, Any],
                     when_written: Callable[[str], None] | None = None) -> None:
        """Log the epoch, then store its checkpoint; `when_written(path)` runs on the writer
        thread once the file is complete."""
        name = f"checkpoints/{epoch_checkpoint_name(metrics.epoch, metrics.avg_loss)}"
        self.last_checkpoint, self._last_epoch = name, metrics.epoch
        # Logs first: whoever learns of the checkpoint also finds the epoch's rows.
        row = metrics.as_dict()
        row["checkpoint_path"] = self.storage.uri(name)
        self.epoch_rows.append(row)
        self._write_csvs()
        self.info.update({
            "epochs_completed": metrics.epoch, "best_epoch": metrics.best_epoch,
            "best_loss": metrics.best_loss,
            "epoch_losses": list(checkpoint["history"]["epoch_losses"]),
            "epoch_times": list(checkpoint["history"]["epoch_times"]),
            "best_model_path": self.storage.uri("checkpoints/best_model.pth"),
        })
        self._write_info()
        self._checkpoint_writes.submit(self._write_epoch_checkpoint, snapshot(checkpoint), name,
                                       metrics.is_best, when_written)

    def on_train_end(self, summary: TrainingSummary, checkpoint: dict[str, Any]) -> None:
        self.wait_for_checkpoints()
        final = f"checkpoints/{self.backbone}_final.pth"
        complete = f"checkpoints/{self.backbone}_final_complete.pth"
        self.storage.save_torch(checkpoint["model_state_dict"], final)
        if self.last_checkpoint and checkpoint["epoch"] == self._last_epoch:
            # The final complete checkpoint is the last epoch's: a second name, not a copy.
            self.storage.copy(self.last_checkpoint, complete)
        else:
            self.storage.save_torch(checkpoint, complete)
        self._write_csvs()
        self.info.update({
            "status": "completed", "train_finished_at": time.time(),
            "final_model_path": self.storage.uri(final),
            "final_complete_path": self.storage.uri(complete),
            "best_model_path": self.storage.uri("checkpoints/best_model.pth"),
            **{k: v for k, v in summary.as_dict().items() if k != "history"},
            "epoch_losses": summary.history.get("epoch_losses", []),
            "epoch_times": summary.history.get("epoch_times", []),
            "history": summary.history,
        })
        self._write_info()

    # -- failures and helpers --------------------------------------------------------------
    def mark_failed(self, error: str) -> None:
        try:
            self.wait_for_checkpoints()  # keep the last good epoch's file
        except Exception:  # the failure being recorded may be this very write
            logger.exception("%s: the last epoch checkpoint could not be written", self.backbone)
        self.info.update({"status": "failed", "error": error})
        self._write_csvs()
        self._write_info()

    def update_info(self, **values: Any) -> None:
        self.info.update(values)
        self._write_info()

    def wait_for_checkpoints(self) -> None:
        """Block until every epoch checkpoint handed over so far is on storage."""
        self._checkpoint_writes.close()

    def _write_epoch_checkpoint(self, checkpoint: dict[str, Any], name: str, is_best: bool,
                                when_written: Callable[[str], None] | None) -> None:
        self.storage.save_torch(checkpoint, name)
        if is_best:
            self.storage.copy(name, "checkpoints/best_model.pth")
        self._prune_epoch_checkpoints()
        if when_written is not None:
            when_written(name)

    def _write_csvs(self) -> None:
        self.storage.write_text("logs/epoch_metrics.csv", _csv_text(EPOCH_COLUMNS, self.epoch_rows))
        self.storage.write_text("logs/batch_metrics.csv", _csv_text(BATCH_COLUMNS, self.batch_rows))

    def _write_info(self) -> None:
        self.storage.write_text("logs/training_info.json", dumps_json(self.info))

    def _prune_epoch_checkpoints(self) -> None:
        if not self.keep_checkpoints:
            return
        epoch_files = sorted((f for f in self.storage.list_files("checkpoints") if EPOCH_FILE.match(f)),
                             key=lambda f: int(EPOCH_FILE.match(f).group(1)))
        for stale in epoch_files[:-self.keep_checkpoints]:
            self.storage.delete(f"checkpoints/{stale}")
