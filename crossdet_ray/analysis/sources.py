"""What to evaluate: the trials of a run directory (or a folder of checkpoints), the checkpoint
of each, the frames, the resize and each trial's resources.

No Ray here: a user mistake is found before anything starts.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossdet_ray.data import DatasetError, NpyYoloDataset
from crossdet_ray.run_files import (BEST_LOSS_FILE, BEST_MAP_FILE, CHECKPOINT_DIR,
                                    DATASET_LISTING_FILE, EPOCH_LOG, EVALUATION_DIR,
                                    RUN_CONFIG_FILE,
                                    final_complete_checkpoint)
from crossdet_ray.data.remote import (RemoteListing, inspect_remote_dataset,
                                      is_remote, printable_uri)
from crossdet_ray.engine.inference import backbone_from_name
from crossdet_ray.engine.storage import RunStorage


CHECKPOINT_CHOICES = ("best_map", "best", "final")
DEFAULT_PATTERN = "*.pth"


class EvaluationError(ValueError):
    """A user mistake (no such run, no checkpoint matches, a bad flag): one line, exit 2."""


@dataclass
class TrialSource:
    name: str
    backbone: str | None
    checkpoint: str | None  # None: the trial has no such checkpoint (see `error`)
    epoch: int | None = None  # the epoch the checkpoint holds, when the logs say
    # The share it trained with (run_config.json); None: the cluster shared out equally.
    cpu: float | None = None
    gpu: float | None = None
    error: str | None = None
    epoch_rows: list[dict[str, str]] | None = None  # logs/epoch_metrics.csv, for the curves


@dataclass
class EvaluationPlan:
    source: str  # the run directory or checkpoint folder
    is_run: bool
    out_dir: str
    trials: list[TrialSource]
    data_dir: str
    split: str  # "test" (the run's test split) or "all" (every labelled frame of --data)
    test_size: float = 0.2
    split_seed: int = 42
    min_size: int | None = None  # None: each checkpoint's own (its saved config)
    max_size: int | None = None
    checkpoint_choice: str = "best_map"
    batch_size: int = 2
    # A bucket dataset (`data` is its URI): each evaluation task's node fetches it once.
    data_listing: RemoteListing | None = None


def read_epoch_rows(trial: RunStorage) -> list[dict[str, str]]:
    """A trial's epoch_metrics.csv rows ([] when it has none), on a disk or in a bucket."""
    try:
        return list(csv.DictReader(io.StringIO(trial.read_text(EPOCH_LOG))))
    except (OSError, UnicodeDecodeError):
        return []


def finite_number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _logged_checkpoint(trial: RunStorage, logged_path: str) -> str | None:
    """The epoch file a row names: at its logged path, or under this trial's checkpoints/
    (the run directory may have moved since)."""
    if not logged_path:
        return None
    if trial.is_local and Path(logged_path).is_file():
        return logged_path
    relative = f"{CHECKPOINT_DIR}/{posixpath.basename(logged_path.partition('?')[0])}"
    return trial.full_uri(relative) if trial.exists(relative) else None


def choose_checkpoint(trial: RunStorage, backbone: str, choice: str,
                      rows: list[dict[str, str]] | None = None
                      ) -> tuple[str | None, int | None, str | None]:
    """(location, epoch, error) of a trial's `choice` checkpoint (a path, or a bucket URI
    that the evaluation task downloads).

    best_map: `best_map_model.pth` when the run kept one, else the epoch with the highest test
    mAP in epoch_metrics.csv whose file is still there (an earlier tie wins); best: the lowest
    loss (`best_model.pth`); final: the last epoch's complete checkpoint. `rows`: the trial's
    epoch_metrics.csv rows when the caller has read them already.
    """
    def kept(relative: str) -> str | None:
        return trial.full_uri(relative) if trial.exists(relative) else None

    if choice == "best":
        relative = BEST_LOSS_FILE
        location = kept(relative)
        return (location, None, None) if location else (
            None, None, f"no {trial.uri(relative)}: the trial saved no epoch")
    if choice == "final":
        relative = final_complete_checkpoint(backbone)
        location = kept(relative)
        return (location, None, None) if location else (
            None, None, f"no {trial.uri(relative)}: the trial did not finish (try --checkpoint "
            "best_map)")
    location = kept(BEST_MAP_FILE)
    if location:
        return location, None, None
    log = trial.uri(EPOCH_LOG)
    rows = read_epoch_rows(trial) if rows is None else rows
    if not rows:
        return None, None, f"no epoch logged in {log}: the trial saved no epoch"
    scored = [(row, finite_number(row.get("map"))) for row in rows]
    scored = [(row, value) for row, value in scored if value is not None]
    if not scored:
        return None, None, (f"{log} has no test mAP (trained without evaluation); use "
                            "--checkpoint best or final")
    scored.sort(key=lambda item: (-item[1], int(item[0]["epoch"])))
    for row, _ in scored:
        path = _logged_checkpoint(trial, row.get("checkpoint_path", ""))
        if path is not None:
            return path, int(row["epoch"]), None
    return None, None, (f"the epoch files of {trial.uri(CHECKPOINT_DIR)} with a test mAP were "
                        "pruned (--keep-checkpoints); use --checkpoint best or final")


def _run_trials(run: RunStorage, config: dict[str, Any], choice: str) -> list[TrialSource]:
    resources = config.get("resources") or {}
    trials = []
    for spec in config.get("trials") or []:
        name, backbone = spec["name"], spec["backbone"]
        share = resources.get(backbone) or {}
        workers = max(int(share.get("workers") or 1), 1)
        # One evaluation process per trial: a data-parallel trial's per-worker share.
        cpu = float(share.get("cpu") or 1.0) / workers
        gpu = float(share.get("gpu") or 0.0) / workers
        trial = run.child(name)
        rows = read_epoch_rows(trial)  # read once: for the choice and the training curves
        if not trial.exists(""):
            path, epoch, error = None, None, f"no folder {trial.uri()}: the trial never started"
        else:
            path, epoch, error = choose_checkpoint(trial, backbone, choice, rows)
        trials.append(TrialSource(name=name, backbone=backbone, checkpoint=path, epoch=epoch,
                                  cpu=cpu, gpu=gpu, error=error, epoch_rows=rows))
    return trials


def _folder_trials(folder: Path, pattern: str) -> list[TrialSource]:
    matches = sorted(Path(p) for p in glob.glob(str(folder / pattern), recursive=True)
                     if Path(p).is_file())
    if not matches:
        raise EvaluationError(f"{folder}: no file matches --checkpoint-pattern {pattern!r}; "
                              "pass a run directory (with its run_config.json) or a pattern "
                              "such as '*/checkpoints/best_model.pth'")
    trials, names = [], set()
    for path in matches:
        parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "checkpoints"]
        name = "-".join(parts)
        if name in names:  # a/b.pth and a-b.pth: keep the names apart
            name = f"{name}-{len(names)}"
        names.add(name)
        trials.append(TrialSource(name=name, backbone=backbone_from_name(path),
                                  checkpoint=str(path)))
    return trials


def plan_evaluation(source: str, *, data: str | None = None, checkpoint: str = "best_map",
                    out: str | None = None, min_size: int | None = None,
                    max_size: int | None = None,
                    checkpoint_pattern: str | None = None) -> EvaluationPlan:
    """Read RUN_DIR (or a checkpoint folder) and the flags into a plan; EvaluationError for a
    user mistake."""
    if checkpoint not in CHECKPOINT_CHOICES:
        raise EvaluationError(f"--checkpoint {checkpoint!r}: choose one of "
                              f"{', '.join(CHECKPOINT_CHOICES)}")
    for flag, value in (("--min-size", min_size), ("--max-size", max_size)):
        if value is not None and value < 1:
            raise EvaluationError(f"{flag} must be at least 1 (got {value})")
    if is_remote(source):
        run = RunStorage.from_uri(source.rstrip("/"))
        try:
            found = run.exists("")
        except OSError as error:
            raise EvaluationError(f"{printable_uri(source)}: cannot be read ({error}); check the "
                                  "URI and this machine's credentials") from error
        if not found or not run.exists(RUN_CONFIG_FILE):
            raise EvaluationError(f"{printable_uri(source)}: no run directory with a "
                                  f"{RUN_CONFIG_FILE} there; pass the run's URI (--log-dir/NAME)")
        if checkpoint_pattern is not None:
            raise EvaluationError("--checkpoint-pattern reads a local folder; a run in a bucket "
                                  "is evaluated by its run_config.json")
    else:
        folder = Path(source).expanduser().resolve()
        if not folder.is_dir():
            raise EvaluationError(f"{source}: no such run directory; pass the folder that holds "
                                  f"{RUN_CONFIG_FILE} (e.g. training_logs/run_20251107_120000)")
        run = RunStorage.from_uri(str(folder))
    if data is not None and not is_remote(data) and not Path(data).expanduser().is_dir():
        raise EvaluationError(f"--data {data}: no such folder; pass the folder that holds "
                              "images/ and labels/ (or a bucket URI, s3://BUCKET/PREFIX)")
    run_config_path = run.uri(RUN_CONFIG_FILE)
    config: dict[str, Any] | None = None
    if run.exists(RUN_CONFIG_FILE):
        try:
            config = json.loads(run.read_text(RUN_CONFIG_FILE))
        except (OSError, ValueError) as error:
            raise EvaluationError(f"{run_config_path} cannot be read ({error}); is the run "
                                  "directory complete?") from error
    if config is None and data is None:
        raise EvaluationError(f"{run.uri()} holds no {RUN_CONFIG_FILE} to name its data: pass "
                              "--data DIR (every labelled frame there is evaluated)")
    if checkpoint_pattern is not None:
        trials = _folder_trials(Path(run.root), checkpoint_pattern)
    elif config is not None:
        trials = _run_trials(run, config, checkpoint)
        if not trials:
            raise EvaluationError(f"{run_config_path} lists no trials")
    else:
        trials = _folder_trials(Path(run.root), DEFAULT_PATTERN)
    train = (config or {}).get("train") or {}
    plan = EvaluationPlan(
        source=run.uri(), is_run=config is not None, out_dir="", trials=trials,
        data_dir="", split="all" if data else "test",
        test_size=float(train.get("test_size", 0.2)),
        split_seed=int(train.get("split_seed", 42)),
        min_size=min_size or train.get("min_size"), max_size=max_size or train.get("max_size"),
        checkpoint_choice=checkpoint if checkpoint_pattern is None else checkpoint_pattern,
        batch_size=int(train.get("batch_size") or 2))
    what = "--data" if data else "the run's dataset"
    if data and is_remote(data):
        plan.data_dir, plan.data_listing = _bucket_dataset(data, plan.test_size)
    elif data:
        plan.data_dir = str(Path(data).expanduser().resolve())
    else:
        plan.data_dir, plan.data_listing = _run_data(config, run)
    if out:
        plan.out_dir = out if is_remote(out) else str(Path(out).expanduser().resolve())
    else:
        plan.out_dir = run.full_uri(EVALUATION_DIR)
    if plan.data_listing is None:  # a bucket's was checked by its preflight
        _check_frames(plan, f"{what} ({plan.data_dir})")
    return plan


def _bucket_dataset(uri: str, test_size: float) -> tuple[str, RemoteListing]:
    try:
        listing, _report = inspect_remote_dataset(uri, test_size)
    except DatasetError as error:
        raise EvaluationError(f"--data: {error}") from error
    return printable_uri(uri), listing


def _check_frames(plan: EvaluationPlan, what: str) -> None:
    """The frames to evaluate exist and split, before any task starts."""
    try:
        frames = NpyYoloDataset(plan.data_dir, split=plan.split, test_size=plan.test_size,
                                seed=plan.split_seed)
    except DatasetError as error:
        raise EvaluationError(f"{what}: {error}") from error
    if len(frames) == 0:
        raise EvaluationError(f"{what}: no labelled frame to evaluate in {plan.data_dir}")


def _run_data(config: dict[str, Any], run: RunStorage) -> tuple[str, RemoteListing | None]:
    """The run's dataset: its folder, its bucket (with the listing the run trained on), or the
    synthetic set made again from its spec."""
    data = config.get("data") or {}
    if data.get("kind") == "remote":
        try:
            listing = RemoteListing.from_json(run.read_text(DATASET_LISTING_FILE))
        except (OSError, ValueError) as error:
            raise EvaluationError(f"the run's dataset listing {run.uri(DATASET_LISTING_FILE)} "
                                  f"cannot be read ({error}); pass --data URI") from error
        return printable_uri(data["uri"]), listing
    resolved = data.get("resolved_path") or data.get("path")
    if resolved and (Path(resolved) / "labels").is_dir():
        return str(resolved), None
    if data.get("kind") == "synthetic":
        from crossdet_ray.data.resolve import ensure_dataset

        return ensure_dataset({k: v for k, v in data.items()
                               if k not in ("resolved_path", "report")}), None
    raise EvaluationError(f"the run's dataset {resolved or '(none recorded)'} (from "
                          f"{run.uri(RUN_CONFIG_FILE)}) is not here; pass --data DIR")
