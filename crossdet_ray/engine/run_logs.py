"""The reference's per-backbone files: CSV logs, training_info.json and its checkpoints.

Layout under one backbone's directory (the seed's, plus best_map_model.pth):
    checkpoints/epoch_XXX_loss_Y.YYYY.pth, best_model.pth (lowest loss), best_map_model.pth
    (highest test mAP), <backbone>_final.pth, <backbone>_final_complete.pth
    logs/epoch_metrics.csv, logs/batch_metrics.csv, logs/training_info.json
Every file goes through `RunStorage`, so it is written atomically, locally or to a cloud bucket.

The promise of these files: **a row in epoch_metrics.csv means the epoch is safe.** An epoch is
committed on the checkpoint writer's thread in this order: its checkpoint file is complete on
storage, it is announced (`report`, i.e. Tune learns of it), then its epoch and batch rows and
training_info.json are written, and only then are older epoch files pruned. A crash anywhere
in between leaves the logs at or behind what a resume will find, never ahead of it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from crossdet_ray.run_files import (BATCH_LOG, BEST_LOSS_FILE, BEST_MAP_FILE, EPOCH_LOG, INFO_FILE,
                                     final_checkpoint, final_complete_checkpoint)
from crossdet_ray.engine.checkpoint import (
    BackgroundWriter,
    CheckpointError,
    SnapshotBuffers,
    epoch_checkpoint_name,
    snapshot,
    validate_checkpoint,
)
from crossdet_ray.engine.json_files import dumps_json
from crossdet_ray.engine.storage import RunStorage
from crossdet_ray.engine.train import BatchMetrics, EpochMetrics, TrainingStopped, TrainingSummary

logger = logging.getLogger(__name__)

# The seed's columns come first, in its order; our extras follow.
EPOCH_COLUMNS = (
    "epoch", "avg_loss", "total_loss", "epoch_time_sec", "learning_rate", "is_best",
    "checkpoint_path", "timestamp",
    "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg",
    "images_per_sec", "map", "map50", "map75", "eval_time_sec", "peak_memory_mb", "is_best_map",
)
BATCH_COLUMNS = (
    "epoch", "batch", "loss", "loss_classifier", "loss_box_reg", "loss_objectness",
    "loss_rpn_box_reg", "timestamp", "batch_time_sec",
)
EPOCH_FILE = re.compile(r"^epoch_(\d{3,})_loss_.*\.pth$")
PARTIAL_FILE = re.compile(r"\.tmp-[0-9a-f]{8}$")  # RunStorage's temporary names

# What `report` receives with a committed epoch: the checkpoint's relative path and the
# epoch's log entry {"epoch", "epoch_row", "batch_rows"}, so whoever is told of the checkpoint
# can restore the rows should the process die before it writes them.
ReportEpoch = Callable[[str, dict[str, Any]], None]


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


def epoch_files(storage: RunStorage) -> dict[int, str]:
    """Complete epoch checkpoints under checkpoints/, by epoch (temporaries left out)."""
    files = {}
    for name in storage.list_files("checkpoints"):
        match = EPOCH_FILE.match(name)
        if match and not PARTIAL_FILE.search(name):
            files[int(match.group(1))] = name
    return files


def logged_epochs(storage: RunStorage) -> list[int]:
    return [int(row["epoch"]) for row in _read_csv(storage, EPOCH_LOG)]


@dataclass
class ResumePoint:
    """Where a trial continues: after `checkpoint` (None: from epoch 1)."""

    checkpoint: dict[str, Any] | None = None
    path: str | None = None
    # The resumed epoch's rows, when the process died between announcing it and logging it.
    log_entry: dict[str, Any] | None = None
    unreadable: list[str] = field(default_factory=list)  # damaged files passed over
    relative: str | None = None  # `path` within the trial's storage, for other processes

    @property
    def epoch(self) -> int:
        return int(self.checkpoint["epoch"]) if self.checkpoint else 0


def find_resume_point(storage: RunStorage, announced: dict[str, Any] | None = None
                      ) -> ResumePoint:
    """The newest safe epoch checkpoint of one trial that loads.

    Safe: logged in epoch_metrics.csv, or `announced` (the epoch Tune last confirmed, with its
    log entry). An epoch file newer than both was written but never announced: it is not
    trusted, and that epoch is trained again. A damaged file is named in a warning and the
    next older one is tried; if none loads, CheckpointError names them all.
    """
    logged = set(logged_epochs(storage))
    announced_epoch = int(announced["epoch"]) if announced else 0
    newest_safe = max(logged | {announced_epoch})
    files = epoch_files(storage)
    unreadable: list[str] = []
    for epoch in sorted((e for e in files if e <= newest_safe), reverse=True):
        relative = f"checkpoints/{files[epoch]}"
        try:
            checkpoint = validate_checkpoint(storage.load_torch(relative), storage.uri(relative))
        except Exception as error:  # truncated, corrupt or foreign: torch raises many types
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            logger.warning("checkpoint %s cannot be read (%s): resuming from an older epoch",
                           storage.uri(relative), reason[:200])
            unreadable.append(storage.uri(relative))
            continue
        entry = None
        if epoch not in logged and announced and announced_epoch == epoch:
            entry = announced.get("log")
        return ResumePoint(checkpoint, storage.uri(relative), entry, unreadable, relative)
    if unreadable:
        raise CheckpointError(
            f"no epoch checkpoint of {storage.uri()} can be read ({', '.join(unreadable)}); "
            "restore one from a backup, or delete the trial's checkpoints/ and logs/ to train "
            "it from epoch 1")
    if logged:
        raise CheckpointError(
            f"{storage.uri(EPOCH_LOG)} shows epochs up to {max(logged)} but no epoch checkpoint "
            f"remains under {storage.uri('checkpoints')}; restore it, or delete the trial's "
            "logs/ to train it from epoch 1")
    return ResumePoint()


class SeedLogWriter:
    """Writes one backbone's files in the seed's layout; a `TrainingListener`.

    Each epoch is committed on a background thread (see the module docstring), so the next
    epoch trains while the checkpoint is written. A failed write is raised in the training
    thread at its next batch (`raise_if_failed`), not an epoch later.
    """

    def __init__(self, storage: RunStorage, backbone: str, config: dict[str, Any],
                 keep_checkpoints: int | None = None, extra_info: dict[str, Any] | None = None,
                 recovered_entry: dict[str, Any] | None = None):
        self.storage = storage
        self.backbone = backbone
        self.config = config
        self.keep_checkpoints = keep_checkpoints
        self.recovered_entry = recovered_entry
        self.info: dict[str, Any] = {
            "backbone": backbone, "status": "running", "config": config,
            **(extra_info or {}),
        }
        self.epoch_rows: list[dict[str, Any]] = []  # committed epochs only
        self.batch_rows: list[dict[str, Any]] = []
        self._epoch_batches: list[dict[str, Any]] = []  # the epoch in training
        self.last_checkpoint: str | None = None  # relative path of the newest committed epoch
        self._last_epoch = 0
        self._writes = BackgroundWriter()
        self._snapshots = SnapshotBuffers()  # the epoch checkpoint's CPU copy, reused
        self._files_lock = threading.Lock()  # rows and info are written from two threads
        self._submit_lock = threading.Lock()
        self._closed = False
        self._started = False  # on_train_start ran: the rows in memory are the trial's

    # -- listener interface -------------------------------------------------------------
    def on_train_start(self, info: dict[str, Any]) -> None:
        start_epoch = int(info.get("start_epoch", 1))
        # Rows past the resume point were written by an attempt whose later checkpoint
        # is not used (damaged, or a resume from an older one): they go, and are retrained.
        self.epoch_rows = [r for r in _read_csv(self.storage, EPOCH_LOG)
                           if int(r["epoch"]) < start_epoch]
        self.batch_rows = [r for r in _read_csv(self.storage, BATCH_LOG)
                           if int(r["epoch"]) < start_epoch]
        entry = self.recovered_entry
        if entry and int(entry["epoch"]) == start_epoch - 1 and not any(
                int(r["epoch"]) == start_epoch - 1 for r in self.epoch_rows):
            # The batch rows may have landed before the process died: replace, never repeat.
            self.batch_rows = [r for r in self.batch_rows if int(r["epoch"]) != entry["epoch"]]
            self.epoch_rows.append(entry["epoch_row"])
            self.batch_rows.extend(entry["batch_rows"])
        previous = self._read_previous_info()
        self.info.update({
            "num_classes": info["num_classes"], "model_parameters": info["num_parameters"],
            "device": info["device"], "train_images": info["train_images"],
            "test_images": info["test_images"], "amp_bf16": info.get("amp_bf16"),
            "activation_checkpointing": info.get("activation_checkpointing"),
            # Epoch seconds, to see when trials ran side by side: fit() entered (data, model
            # build), then its first epoch about to start.
            "fit_started_at": info.get("started_at"),
            "train_started_at": time.time(),
            "resumed_at_epochs": list(previous.get("resumed_at_epochs", [])),
            "epochs_completed": start_epoch - 1,
        })
        if start_epoch > 1:
            self.info["resumed_at_epochs"].append(start_epoch)
        if info.get("init_from"):
            # On resume the weights are not loaded again, so the first attempt's record of
            # the source epoch stays.
            self.info["init_from"] = {**info["init_from"], **{
                k: v for k, v in (previous.get("init_from") or {}).items()
                if info["init_from"].get(k) is None}}
        for name in self.storage.list_files("checkpoints"):
            match = EPOCH_FILE.match(name)
            # Epochs past the resume point, and temporaries of a write a crash cut short.
            if (match and int(match.group(1)) >= start_epoch) or PARTIAL_FILE.search(name):
                self.storage.delete(f"checkpoints/{name}")
        self._relink_best_map(info.get("best_map_epoch", 0), start_epoch)
        with self._files_lock:
            self._write_csvs()
            self._write_info()
        self._started = True

    def on_batch_end(self, metrics: BatchMetrics) -> None:
        self._epoch_batches.append(vars(metrics).copy())

    def should_stop(self) -> bool:
        """Raise a failed background write now; True once `close_for_stop` was called."""
        self.raise_if_failed()
        return self._closed

    def on_epoch_end(self, metrics: EpochMetrics, checkpoint: dict[str, Any],
                     report: ReportEpoch | None = None) -> None:
        """Commit the epoch in the background: checkpoint file, `report`, rows, pruning."""
        name = f"checkpoints/{epoch_checkpoint_name(metrics.epoch, metrics.avg_loss)}"
        row = metrics.as_dict()
        row["checkpoint_path"] = self.storage.uri(name)
        entry = {"epoch": metrics.epoch, "epoch_row": row, "batch_rows": self._epoch_batches}
        self._epoch_batches = []
        info = {
            "epochs_completed": metrics.epoch, "best_epoch": metrics.best_epoch,
            "best_loss": metrics.best_loss,
            "epoch_losses": list(checkpoint["history"]["epoch_losses"]),
            "epoch_times": list(checkpoint["history"]["epoch_times"]),
            "best_model_path": self.storage.uri(BEST_LOSS_FILE),
            "best_map_epoch": metrics.best_map_epoch, "best_map": metrics.best_map,
        }
        if metrics.best_map_epoch:
            info["best_map_model_path"] = self.storage.uri(BEST_MAP_FILE)
        with self._submit_lock:
            if self._closed:  # a stop was asked for: this epoch is not committed
                raise TrainingStopped(f"{self.backbone}: stopped before epoch {metrics.epoch} "
                                      "was saved; it will be trained again on --resume")
            # The previous epoch's write has finished before its buffers are reused.
            self._writes.wait()
            self._writes.submit(self._commit_epoch, self._snapshots.take(checkpoint), name,
                                metrics.is_best, entry, info, report, metrics.is_best_map)

    def on_train_end(self, summary: TrainingSummary, checkpoint: dict[str, Any]) -> None:
        self.wait_for_checkpoints()
        final = final_checkpoint(self.backbone)
        complete = final_complete_checkpoint(self.backbone)
        # CPU copies: a file written on a GPU must load on a machine without one.
        self.storage.save_torch(snapshot(checkpoint["model_state_dict"]), final)
        if self.last_checkpoint and checkpoint["epoch"] == self._last_epoch:
            # The final complete checkpoint is the last epoch's: a second name, not a copy.
            self.storage.copy(self.last_checkpoint, complete)
        else:
            self.storage.save_torch(snapshot(checkpoint), complete)
        with self._files_lock:
            self._write_csvs()
            self.info.update({
                "status": "completed", "train_finished_at": time.time(),
                "final_model_path": self.storage.uri(final),
                "final_complete_path": self.storage.uri(complete),
                "best_model_path": self.storage.uri(BEST_LOSS_FILE),
                **({"best_map_model_path": self.storage.uri(BEST_MAP_FILE)}
                   if summary.best_map_epoch else {}),
                **{k: v for k, v in summary.as_dict().items() if k != "history"},
                "epoch_losses": summary.history.get("epoch_losses", []),
                "epoch_times": summary.history.get("epoch_times", []),
                "history": summary.history,
            })
            self._write_info()

    # -- stopping, failures and helpers ----------------------------------------------------
    def close_for_stop(self) -> None:
        """Accept no new epoch, and wait until the one being committed (if any) is done.

        Called on Ctrl-C: the in-flight checkpoint is finished and announced, then the trial
        can be stopped with its logs and checkpoints in step.
        """
        with self._submit_lock:
            self._closed = True
        self._writes.wait()

    def raise_if_failed(self) -> None:
        self._writes.raise_if_failed()

    def mark_failed(self, error: str, **details: Any) -> None:
        try:
            self.wait_for_checkpoints()  # keep the last good epoch's file
        except BaseException:  # the failure being recorded may be this very write
            logger.exception("%s: the last epoch checkpoint could not be written", self.backbone)
        with self._files_lock:
            if not self._started:
                # Failed before training (e.g. no checkpoint loads): the files on storage are
                # an earlier attempt's record, kept whole; only the verdict is added.
                self.info = {**self._read_previous_info(), **{
                    k: v for k, v in self.info.items() if k not in ("status", "config")}}
            self.info.update({"status": "failed", "error": error, "failed_at": time.time(),
                              **details})
            try:
                if self._started:
                    self._write_csvs()
                self._write_info()
            except OSError:  # a full disk: the trial's failure still reaches Tune and the log
                logger.exception("%s: could not record the failure in %s", self.backbone,
                                 self.storage.uri(INFO_FILE))

    def update_info(self, **values: Any) -> None:
        with self._files_lock:
            self.info.update(values)
            self._write_info()

    def wait_for_checkpoints(self) -> None:
        """Block until every epoch handed over so far is committed (or raise its failure)."""
        try:
            self._writes.close()
        finally:
            self._snapshots.clear()

    def _commit_epoch(self, checkpoint: dict[str, Any], name: str, is_best: bool,
                      entry: dict[str, Any], info: dict[str, Any],
                      report: ReportEpoch | None, is_best_map: bool = False) -> None:
        self.storage.save_torch(checkpoint, name)
        # Second names of the epoch file (hard links on local disks), made before the epoch
        # is announced, like the file itself; pruning never touches them.
        if is_best:
            self.storage.copy(name, BEST_LOSS_FILE)
        if is_best_map:
            self.storage.copy(name, BEST_MAP_FILE)
        try:
            if report is not None:
                report(name, entry)
        except SystemExit:
            # Tune took the report and then ended the trial (ASHA's stop): the epoch is
            # announced, so its rows belong in the logs before the process goes.
            self._log_epoch(name, entry, info)
            raise
        self._log_epoch(name, entry, info)
        self._prune_epoch_checkpoints()

    def _log_epoch(self, name: str, entry: dict[str, Any], info: dict[str, Any]) -> None:
        with self._files_lock:
            self.epoch_rows.append(entry["epoch_row"])
            self.batch_rows.extend(entry["batch_rows"])
            self.last_checkpoint, self._last_epoch = name, entry["epoch"]
            self.info.update(info)
            self._write_csvs()
            self._write_info()

    def _relink_best_map(self, best_map_epoch: int, start_epoch: int) -> None:
        """On resume, point best_map_model.pth back at the resumed checkpoint's best-mAP epoch.

        A crash after an epoch became best_map_model.pth but before it was announced leaves
        the name on an epoch that is now trained again: it goes back to the safe epoch's file
        when that file is still there (it may have been pruned, and then the name is kept).
        """
        if start_epoch <= 1:
            if self.storage.exists(BEST_MAP_FILE):  # nothing safe yet: any such file is stale
                self.storage.delete(BEST_MAP_FILE)
            return
        files = epoch_files(self.storage)
        if best_map_epoch in files:
            self.storage.copy(f"checkpoints/{files[best_map_epoch]}", BEST_MAP_FILE)

    def _read_previous_info(self) -> dict[str, Any]:
        try:
            return json.loads(self.storage.read_text(INFO_FILE))
        except (OSError, ValueError):  # none yet, or a damaged one: start a new record
            return {}

    def _write_csvs(self) -> None:
        # Batch rows first: an epoch row (the "safe" mark) never stands without its batches.
        self.storage.write_text(BATCH_LOG, _csv_text(BATCH_COLUMNS, self.batch_rows))
        self.storage.write_text(EPOCH_LOG, _csv_text(EPOCH_COLUMNS, self.epoch_rows))

    def _write_info(self) -> None:
        self.storage.write_text(INFO_FILE, dumps_json(self.info))

    def _prune_epoch_checkpoints(self) -> None:
        """Keep the newest `keep_checkpoints` epoch files; runs only after the newest epoch
        was announced and logged, so the file a resume would use is never the one removed."""
        if not self.keep_checkpoints:
            return
        files = epoch_files(self.storage)
        for epoch in sorted(files)[:-self.keep_checkpoints]:
            self.storage.delete(f"checkpoints/{files[epoch]}")


def restore_announced_epoch(storage: RunStorage, announced: dict[str, Any]) -> bool:
    """Add an announced epoch's rows to a finished trial's logs if its process died before
    writing them (e.g. ASHA stopped it right after the report). True when rows were added."""
    entry = announced.get("log")
    if not entry or int(entry["epoch"]) in set(logged_epochs(storage)):
        return False
    epoch = int(entry["epoch"])
    epoch_rows = [r for r in _read_csv(storage, EPOCH_LOG) if int(r["epoch"]) < epoch]
    batch_rows = [r for r in _read_csv(storage, BATCH_LOG) if int(r["epoch"]) < epoch]
    storage.write_text(BATCH_LOG, _csv_text(BATCH_COLUMNS, batch_rows + entry["batch_rows"]))
    storage.write_text(EPOCH_LOG, _csv_text(EPOCH_COLUMNS, epoch_rows + [entry["epoch_row"]]))
    try:
        info = json.loads(storage.read_text(INFO_FILE))
    except (OSError, ValueError):
        return True
    if int(info.get("epochs_completed") or 0) < epoch:
        info["epochs_completed"] = epoch
        storage.write_text(INFO_FILE, dumps_json(info))
    return True
