"""What a finished run writes, read back: every file against the others and against figures
worked out here, not only that the files exist. One real run of the command (the test
backbone at two learning rates, two epochs) is shared by the module."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from crossdet_ray.engine.run_logs import EPOCH_COLUMNS
from crossdet_ray.tune.summary import SUMMARY_COLUMNS

from .helpers import assert_epochs_once, assert_trained, epoch_rows, run, training_info

pytestmark = pytest.mark.ray

SEED_EPOCH_COLUMNS = ["epoch", "avg_loss", "total_loss", "epoch_time_sec", "learning_rate",
                      "is_best", "checkpoint_path", "timestamp"]
BACKBONE = "test_mit"
EPOCHS = 2
LR, LR_STEP, LR_GAMMA = 0.004, 1, 0.5
GRID = (1.0, 0.5)  # --lr-grid: two trials of the one backbone
TRIAL_LRS = {f"{BACKBONE}_lr{LR * m:g}": LR * m for m in GRID}
TRIALS = sorted(TRIAL_LRS)
# Every epoch_metrics.csv column that Tune also receives as a number (the trial reporter
# drops the timestamp, and the checkpoint path is not a metric).
REPORTED_COLUMNS = [c for c in EPOCH_COLUMNS if c not in ("timestamp", "checkpoint_path")]


def _argv(data: str, log_dir: Path) -> list[str]:
    # Flags away from their defaults wherever the run allows, so that the round trip through
    # run_config.json cannot pass by defaults alone.
    return ["--data", data, "--backbones", BACKBONE, "--epochs", str(EPOCHS),
            "--lr", str(LR), "--lr-step-size", str(LR_STEP), "--lr-gamma", str(LR_GAMMA),
            "--batch-size", "2", "--num-workers", "0", "--min-size", "64", "--max-size", "64",
            "--seed", "3", "--amp", "off", "--channels-last", "off",
            "--log-dir", str(log_dir), "--name", "outputs", "--gpus-per-trial", "0",
            "--cpus-per-trial", "1", "--keep-checkpoints", "1", "--max-failures", "1",
            "--synthetic-images", "8", "--no-dashboard", "--verbose", "0", "--address", "local",
            "--lr-grid", *map(str, GRID)]


@pytest.fixture(scope="module")
def finished_run(tiny_dataset, tmp_path_factory):
    """(argv, run directory) of a finished run, which trained: each trial's loss moved."""
    folder = tmp_path_factory.mktemp("outputs")
    argv = _argv(tiny_dataset, folder / "logs")
    try:
        result = run(argv, folder, "command", timeout=540)
        assert result.process.returncode == 0, result.stderr[-3000:]
        for trial in TRIALS:
            assert_trained(folder / "logs" / "outputs" / trial)
        yield argv, folder / "logs" / "outputs"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _float(text: str) -> float | None:
    return None if text == "" else float(text)


def _csv_numbers(row: dict[str, str], column: str) -> float | None:
    if column in ("is_best", "is_best_map"):
        return {"True": 1.0, "False": 0.0}[row[column]]
    return _float(row[column])


def _masked_crc32c(data: bytes) -> int:
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data) & 0xFFFFFFFF
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def tensorboard_scalars(trial_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from every events file of a trial, read record by record
    (TFRecord framing: length, its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, dict[int, float]] = {}
    files = sorted(trial_dir.glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard events in {trial_dir}"
    for path in files:
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            header = data[offset:offset + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
            payload = data[offset + 12:offset + 12 + length]
            (payload_crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
            assert header_crc == _masked_crc32c(header), f"{path}: damaged record at {offset}"
            assert payload_crc == _masked_crc32c(payload), f"{path}: damaged record at {offset}"
            offset += 16 + length
            event = Event.FromString(payload)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    steps = scalars.setdefault(value.tag, {})
                    assert event.step not in steps, f"{value.tag} logged twice at {event.step}"
                    steps[event.step] = value.simple_value
    return scalars


def test_run_directory_has_the_seed_layout_and_tune_state(finished_run):
    from ray import tune

    from crossdet_ray.models import build_detector

    _, run_dir = finished_run
    for name in ("run_config.json", "final_summary.json", "summary.csv", "summary.parquet",
                 "training_curves.png"):
        assert (run_dir / name).is_file(), name
    backbone = BACKBONE
    for name in TRIALS:
        trial = run_dir / name
        files = sorted(p.name for p in (trial / "checkpoints").iterdir())
        # --keep-checkpoints 1: the last epoch file, plus best and final.
        epoch_files = [f for f in files if f.startswith("epoch_")]
        assert len(epoch_files) == 1 and epoch_files[0].startswith("epoch_002_loss_")
        assert sorted(set(files) - set(epoch_files)) == sorted(
            ["best_model.pth", "best_map_model.pth", f"{backbone}_final.pth",
             f"{backbone}_final_complete.pth"])
        rows = epoch_rows(trial)
        assert list(rows[0]) == list(EPOCH_COLUMNS)
        assert list(rows[0])[:8] == SEED_EPOCH_COLUMNS
        assert_epochs_once(trial, EPOCHS)
        info = training_info(trial)
        for key in ("backbone", "status", "config", "model_parameters", "best_epoch",
                    "best_loss", "epoch_losses", "epoch_times", "final_model_path", "device",
                    "node", "pid", "resources"):
            assert key in info, key
        # The seed's "Load Best Model for Inference" recipe.
        checkpoint = torch.load(trial / "checkpoints" / "best_model.pth", weights_only=True)
        model = build_detector(backbone, num_classes=2)
        model.load_state_dict(checkpoint["model_state_dict"])
        assert checkpoint["epoch"] == info["best_epoch"]
        # The highest-mAP epoch's second name survives --keep-checkpoints 1.
        best_map = torch.load(trial / "checkpoints" / "best_map_model.pth", weights_only=True)
        assert best_map["epoch"] == info["best_map_epoch"] >= 1
        assert sum(p.numel() for p in model.parameters()) == info["model_parameters"]
    # Tune's own tools read the same directory.
    results = tune.ExperimentAnalysis(str(run_dir))
    assert sorted(t.config["trial"]["name"] for t in results.trials) == TRIALS


def test_epoch_rows_follow_the_schedule_and_mark_the_best(finished_run):
    _, run_dir = finished_run
    for trial, lr in TRIAL_LRS.items():
        rows = epoch_rows(run_dir / trial)
        for row in rows:
            epoch = int(row["epoch"])
            # StepLR, worked out here: lr * gamma ** floor((epoch - 1) / step).
            assert float(row["learning_rate"]) == pytest.approx(
                lr * LR_GAMMA ** ((epoch - 1) // LR_STEP), rel=1e-12)
        losses = [float(r["avg_loss"]) for r in rows]
        running_best = [losses[i] < min(losses[:i], default=math.inf) for i in range(len(rows))]
        assert [r["is_best"] == "True" for r in rows] == running_best
        info = training_info(run_dir / trial)
        assert info["epoch_losses"] == losses


def test_tensorboard_holds_each_epoch_row(finished_run):
    _, run_dir = finished_run
    for backbone in TRIALS:
        rows = epoch_rows(run_dir / backbone)
        scalars = tensorboard_scalars(run_dir / backbone)
        losses = [float(r["avg_loss"]) for r in rows]
        for row in rows:
            epoch = int(row["epoch"])
            # TensorBoard keeps float32: the CSV's value rounded to float32 must be it exactly.
            for column in REPORTED_COLUMNS:
                expected = _csv_numbers(row, column)
                tag = f"ray/tune/{column}"
                if expected is None:  # no mAP: not reported, so not logged either
                    assert epoch not in scalars.get(tag, {}), (backbone, tag, epoch)
                    continue
                assert scalars[tag][epoch] == np.float32(expected), (backbone, tag, epoch)
            # The running best, which the CSV does not hold, worked out from its losses.
            best = min(losses[:epoch])
            assert scalars["ray/tune/best_loss"][epoch] == np.float32(best)
            assert scalars["ray/tune/best_epoch"][epoch] == losses.index(best) + 1
        for tag in ("ray/tune/avg_loss", "ray/tune/map", "ray/tune/learning_rate"):
            assert sorted(scalars[tag]) == list(range(1, EPOCHS + 1)), (backbone, tag)


def _records(frame: pd.DataFrame) -> list[dict]:
    """Rows with every missing value as None (Parquet keeps None, a CSV reads back NaN)."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in frame.astype(object).to_dict("records")]


def test_summary_tables_agree_with_each_trials_files(finished_run):
    _, run_dir = finished_run
    from_csv = pd.read_csv(run_dir / "summary.csv")
    from_parquet = pd.read_parquet(run_dir / "summary.parquet")
    assert list(from_csv.columns) == list(from_parquet.columns) == list(SUMMARY_COLUMNS)
    assert _records(from_csv) == _records(from_parquet)
    summary = json.loads((run_dir / "final_summary.json").read_text())
    assert summary["num_trials"] == summary["num_succeeded"] == len(TRIALS)
    evaluation_rows = json.loads((run_dir / "evaluation" / "results.json").read_text())["trials"]

    for row, from_json in zip(_records(from_parquet), summary["results"], strict=True):
        name = row["trial"]
        info = training_info(run_dir / name)
        rows = epoch_rows(run_dir / name)
        losses = [float(r["avg_loss"]) for r in rows]
        best_epoch = losses.index(min(losses)) + 1
        best_row = rows[best_epoch - 1]
        assert (row["backbone"], row["lr"], row["status"]) == (BACKBONE, TRIAL_LRS[name],
                                                               "completed")
        assert row["status"] == info["status"]
        assert row["params"] == info["model_parameters"] > 0
        assert row["epochs_completed"] == info["epochs_completed"] == len(rows) == EPOCHS
        assert row["best_epoch"] == info["best_epoch"] == best_epoch
        assert row["best_loss"] == info["best_loss"] == min(losses)
        assert row["final_loss"] == losses[-1]
        for column in ("map", "map50", "map75"):
            assert row[column] == _float(best_row[column]), column
        maps = [_float(r["map"]) for r in rows]
        best_map_epoch = maps.index(max(maps)) + 1  # the first epoch at the highest mAP
        assert row["best_map_epoch"] == info["best_map_epoch"] == best_map_epoch
        for column in ("map", "map50", "map75"):
            assert row[f"best_{column}"] == _float(rows[best_map_epoch - 1][column]), column
        for key in ("train_images_per_sec", "total_time_sec",
                    "device", "node", "node_id", "best_model_path", "best_map_model_path",
                    "final_model_path",
                    "final_complete_path"):
            assert row[key] == info[key], key
        assert json.loads(row["resources"]) == info["resources"] == {"cpu": 1.0, "gpu": 0.0,
                                                                        "workers": 1}
        # The run ended with its evaluation, which timed each trial alone: its figures
        # replace the ones taken at the end of training, while the other trial shared the
        # two cores; those stay beside them.
        (timed,) = [r for r in evaluation_rows if r["trial"] == name]
        assert (row["infer_ms_per_image"], row["fps"]) == (
            timed["infer_ms_per_image"], timed["fps"])
        assert row["infer_ms_per_image"] != info["infer_ms_per_image"]
        assert row["inference_measured"] == "alone (evaluation)"
        assert row["infer_ms_per_image_during_training"] == info["infer_ms_per_image"]
        # The plan's prediction beside the measurement (hours).
        plan = json.loads((run_dir / "run_config.json").read_text())["plan"]
        (planned,) = [t for t in plan["trials"] if t["trial"] == name]
        assert row["predicted_hours"] == planned["predicted_hours"] > 0
        assert row["measured_hours"] == pytest.approx(info["total_time_sec"] / 3600, abs=1e-4)
        # final_summary.json says the same as the tables.
        assert {k: from_json[k] for k in SUMMARY_COLUMNS if k != "resources"} == {
            k: row[k] for k in SUMMARY_COLUMNS if k != "resources"}
        assert from_json["resources"] == info["resources"]
    assert sorted(r["trial"] for r in summary["results"]) == TRIALS
    # The ranking follows the figures taken alone, and the printed one says so.
    assert summary["rankings"]["inference_ms_per_image"] == sorted(
        TRIALS, key=lambda t: next(r["infer_ms_per_image"] for r in evaluation_rows
                                      if r["trial"] == t))
    stdout = (run_dir.parent.parent / "command.out").read_text()
    assert ("Inference ranking (ms/image, fastest first; each trial timed alone by the "
            "evaluation): ") in stdout


def test_training_curves_png_is_the_figure_asked_for(finished_run):
    from PIL import Image

    _, run_dir = finished_run
    with Image.open(run_dir / "training_curves.png") as image:
        assert image.format == "PNG"
        # figsize 12 x 4.5 inches at 100 dpi.
        assert image.size == (1200, 450)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    colours = {tuple(p) for p in np.unique(pixels, axis=0)}
    # One line per trial, in matplotlib's first colours (C0, C1), and no third.
    assert (31, 119, 180) in colours and (255, 127, 14) in colours
    assert (44, 160, 44) not in colours


def test_run_config_round_trips_to_the_flags(finished_run):
    from crossdet_ray.cli import build_parser, config_from_args
    from crossdet_ray.tune.launcher import LaunchConfig

    argv, run_dir = finished_run
    saved = json.loads((run_dir / "run_config.json").read_text())
    from_flags = config_from_args(build_parser().parse_args(argv))
    # Everything but the plan comes from the flags; the plan is what the run made of them.
    restored = LaunchConfig.from_dict(saved)
    assert restored.plan is not None and from_flags.plan is None
    restored.plan = None
    assert restored == from_flags
    assert sorted(t["trial"] for t in saved["plan"]["trials"]) == TRIALS
    assert sorted(saved["trials"], key=lambda t: t["name"]) == [
        {"name": t, "backbone": BACKBONE, "lr": TRIAL_LRS[t]} for t in TRIALS]


def test_resuming_a_finished_run_changes_nothing(finished_run):
    _, run_dir = finished_run
    files_before = sorted(run_dir.rglob("*"))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(run_dir.rglob("*"))
              if p.is_file() and p.suffix in (".json", ".csv", ".parquet", ".png")}
    result = run(["--resume", str(run_dir)], run_dir.parent.parent, "resume", timeout=240)
    assert result.process.returncode == 0, result.stderr[-3000:]
    assert "Nothing to resume" in result.stdout
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in before}
    assert after == before
    assert sorted(run_dir.rglob("*")) == files_before  # nothing added, nothing removed


def test_the_run_ends_with_its_evaluation_report(finished_run):
    _, run_dir = finished_run
    stdout = (run_dir.parent.parent / "command.out").read_text()
    report = run_dir / "evaluation" / "report.html"
    assert f"Evaluation report: {report}" in stdout.splitlines()[-2:]  # among the last lines
    assert report.is_file() and "data:image/png;base64," in report.read_text()
    results = pd.read_csv(run_dir / "evaluation" / "results.csv")
    assert sorted(results["trial"]) == TRIALS
