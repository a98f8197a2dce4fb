"""The machinery's numbers: the command learns an easy set, its mAP is COCO's, ASHA acts.

One run of the command serves every test here (a module fixture): the test backbone over an LR
grid of two, `--lr 0.01 --lr-grid 1 1e-5 --scheduler asha`, on a small easy synthetic set. The
lr 0.01 trial is the learning run; the lr 1e-7 trial cannot learn and ASHA must stop it. That
the real mit_b0 learns is tests/engine/test_learning_real.py's promise.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from .helpers import epoch_rows, run, training_info

pytestmark = pytest.mark.ray

# The easy set: 40 frames (32 train, 8 test) of 96x144 px, 1-2 warm objects each, 35-55 % of
# the short side tall. --min-size 64 --max-size 96 resizes every frame by 2/3 (to 64x96, no
# padding), so a box not scaled back to the frame, or height and width swapped, would show in
# the independent COCO check below.
FRAMES, FRAME_SIZE, DATA_SEED = 40, (96, 144), 0
MAX_OBJECTS, OBJECT_SCALE = 2, (0.35, 0.55)
MIN_SIZE, MAX_SIZE = 64, 96
EPOCHS, LR, LR_STEP = 4, 0.01, 3
BACKBONE = "test_mit"
GOOD, BAD = "test_mit_lr0.01", "test_mit_lr1e-07"  # --lr-grid 1 1e-5

# Measured with the engine on this set (the same settings, model seeds 0-3; seed 0 is the
# command's default), map50 per epoch 1-4 and avg_loss first -> last:
#   seed 0: 0.341 0.273 0.488 0.506, loss 1.160 -> 0.317
#   seed 1: 0.162 0.291 0.471 0.561, loss 1.112 -> 0.372
#   seed 2: 0.237 0.350 0.566 0.563, loss 1.161 -> 0.338
#   seed 3: 0.205 0.413 0.479 0.606, loss 1.110 -> 0.319
# Final map50 0.51-0.61 and last/first loss 0.27-0.34, while a detector that does not learn
# (lr 1e-7, seeds 0-3) scores map50 0.013-0.078 with its random boxes on these big objects.
MIN_FINAL_MAP50 = 0.35
MAX_LOSS_RATIO = 0.5
# The test's forward pass uses the run's weights, frames, batches and torch thread count, so
# the predictions are bit-identical and COCOeval's numbers matched exactly at every epoch (with
# 2 threads instead of 1, or batches of 1, epoch 1 differed by 1.4e-4 in map50). The slack is
# for ground truth rounded through float32 pixels in the run but not here.
MAP_TOLERANCE = 1e-6


def _one_trial_at_a_time_cpus() -> float:
    """--cpus-per-trial that lets only one trial run: more than half of the local Ray's CPUs.

    On 2 CPUs that is 1.5, which still gives torch one thread (trials get int(cpus)); two
    threads measured several times slower on the shared 2-core machine.
    """
    from ray._private.utils import get_num_cpus  # what a local ray.init() counts

    return get_num_cpus() / 2 + 0.5


@pytest.fixture(scope="module")
def easy_dataset(quick_start_set) -> Path:
    """The quick start's set (tests/conftest.py); the test below checks it is this module's."""
    return quick_start_set


@pytest.fixture(scope="module")
def asha_run(easy_dataset, tmp_path_factory) -> Path:
    """Run the command once: lr 0.01 (learns) and lr 1e-7 (cannot), ASHA on test mAP.

    Why the bad trial is stopped for certain, not by luck: ASHA (grace_period 1, reduction
    factor 2, max_t 4) has rungs at epochs 1 and 2 below the last epoch. A trial reaching a
    rung is stopped when its mAP is below the median of what the trials before it recorded
    there; the first to reach a rung has nothing to compare with and always goes on. So with
    two trials side by side the bad one escapes whenever it happens to report first at both
    rungs. Here only one trial fits at a time (see _one_trial_at_a_time_cpus) and Tune starts
    them in grid order, so the good trial has recorded epochs 1 and 2 before the bad one reports
    at all: the bad one stops at epoch 1 (mAP measured over model seeds 0-3: 0.004-0.022 at
    lr 1e-7 against 0.035-0.087 at lr 0.01), or at epoch 2 at the latest (at most 0.010
    against 0.082-0.132), before its 4th epoch.
    """
    log_dir = tmp_path_factory.mktemp("learning_logs")
    args = [
        "--data", str(easy_dataset), "--backbones", BACKBONE,
        "--min-size", str(MIN_SIZE), "--max-size", str(MAX_SIZE), "--num-workers", "0",
        "--epochs", str(EPOCHS), "--lr", str(LR), "--lr-step-size", str(LR_STEP),
        "--lr-grid", "1", "1e-5", "--scheduler", "asha",
        "--gpus-per-trial", "0", "--cpus-per-trial", f"{_one_trial_at_a_time_cpus():g}",
        "--log-dir", str(log_dir), "--name", "learn", "--no-dashboard", "--no-evaluate", "--verbose", "0",
    ]
    # Its own local Ray (no RAY_ADDRESS); whatever a timed-out run leaves is killed.
    result = run(args, log_dir / "output", "learn", timeout=560)
    assert result.process.returncode == 0, result.stderr[-3000:]
    return log_dir / "learn"


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "final_summary.json").read_text())


def test_the_easy_set_holds_one_or_two_large_boxes_a_frame(easy_dataset):
    counts, heights = [], []
    for labels in sorted((easy_dataset / "labels").glob("*.txt")):
        lines = [line.split() for line in labels.read_text().splitlines() if line.strip()]
        counts.append(len(lines))
        heights += [float(fields[4]) for fields in lines]  # normalised by the frame height
    assert len(counts) == FRAMES and set(counts) <= {1, 2} and 2 in counts
    short_side = min(FRAME_SIZE)
    # Heights are rounded to whole pixels, hence the half-pixel slack.
    assert min(heights) * FRAME_SIZE[0] >= OBJECT_SCALE[0] * short_side - 0.5
    assert max(heights) * FRAME_SIZE[0] <= OBJECT_SCALE[1] * short_side + 0.5
    metadata = json.loads((easy_dataset / "synthetic.json").read_text())
    assert (metadata["max_objects"], metadata["object_scale"], metadata["seed"]) == (
        MAX_OBJECTS, list(OBJECT_SCALE), DATA_SEED)


def test_the_command_learns_the_easy_set(asha_run):
    rows = epoch_rows(asha_run / GOOD)
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    map50 = [float(r["map50"]) for r in rows]
    losses = [float(r["avg_loss"]) for r in rows]
    assert map50[-1] >= MIN_FINAL_MAP50, f"map50 per epoch: {map50}"
    assert losses[-1] < MAX_LOSS_RATIO * losses[0], f"avg_loss per epoch: {losses}"
    # --lr-step-size 3: the StepLR decay shows in the logged rates.
    assert [float(r["learning_rate"]) for r in rows] == pytest.approx([LR] * 3 + [LR * 0.1])


# -- an independent COCO computation -----------------------------------------------------------
def _test_split(data_dir: Path) -> list[str]:
    """The README's split, by scikit-learn itself, over the sorted frames with boxes."""
    from sklearn.model_selection import train_test_split

    frames = sorted(p.name for p in (data_dir / "images").glob("*.npy")
                    if (data_dir / "labels" / f"{p.stem}.txt").is_file()
                    and (data_dir / "labels" / f"{p.stem}.txt").read_text().strip())
    return train_test_split(frames, test_size=0.2, random_state=42)[1]


def _ground_truth(data_dir: Path, frames: list[str]) -> dict:
    """COCO ground truth straight from the YOLO files: category = class + 1 (0 = background)."""
    images, annotations = [], []
    for image_id, name in enumerate(frames):
        height, width = np.load(data_dir / "images" / name, mmap_mode="r").shape[:2]
        images.append({"id": image_id, "height": height, "width": width})
        for line in (data_dir / "labels" / name.replace(".npy", ".txt")).read_text().split("\n"):
            if not line.strip():
                continue
            class_id, x_center, y_center, w, h = map(float, line.split())
            box = [(x_center - w / 2) * width, (y_center - h / 2) * height, w * width, h * height]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(class_id) + 1, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})
    return {"images": images, "annotations": annotations, "categories": [{"id": 1}]}


def _coco_ap(truth: dict, detections: list[dict]) -> tuple[float, float]:
    """(AP@[.5:.95], AP@.5) by pycocotools' COCOeval; 0 with nothing detected."""
    import contextlib
    import copy
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(truth)  # COCO keeps what it is given
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(detections), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return max(float(evaluator.stats[0]), 0.0), max(float(evaluator.stats[1]), 0.0)


def _predict(checkpoint_path: Path, data_dir: Path, frames: list[str], batch_size: int,
             threads: int) -> list[dict]:
    """COCO detections of the checkpoint's detector, fed the frames as the README describes."""
    import torch

    from crossdet_ray.models import build_detector

    checkpoint = torch.load(checkpoint_path, weights_only=True)
    model = build_detector(BACKBONE, num_classes=2, min_size=MIN_SIZE, max_size=MAX_SIZE)
    model.load_state_dict(checkpoint["model_state_dict"])
    model.eval()
    detections = []
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # the trial's: the same kernels, the same rounding
    try:
        with torch.no_grad():
            for start in range(0, len(frames), batch_size):
                names = frames[start:start + batch_size]
                # uint8 frames divided by 255: (H, W, 5) -> contiguous (5, H, W) in [0, 1].
                # Contiguous as the loader makes them: a transposed view takes other kernels
                # and moved epoch 1's scores by up to 0.014 here.
                images = [torch.from_numpy(np.ascontiguousarray(
                    np.load(data_dir / "images" / name).transpose(2, 0, 1), dtype=np.float32)
                    / np.float32(255)) for name in names]
                for offset, output in enumerate(model(images)):
                    for (x1, y1, x2, y2), label, score in zip(output["boxes"].tolist(),
                                                              output["labels"].tolist(),
                                                              output["scores"].tolist()):
                        detections.append({"image_id": start + offset, "category_id": label,
                                           "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    finally:
        torch.set_num_threads(previous_threads)
    return detections


def test_logged_map_is_cocos_on_the_test_split(asha_run, easy_dataset):
    import torch

    trial = asha_run / GOOD
    checkpoint_path = trial / "checkpoints" / "best_model.pth"
    epoch = int(torch.load(checkpoint_path, weights_only=True)["epoch"])
    row = next(r for r in epoch_rows(trial) if int(r["epoch"]) == epoch)
    info = training_info(trial)

    frames = _test_split(easy_dataset)
    assert len(frames) == 8  # ceil(0.2 * 40)
    truth = _ground_truth(easy_dataset, frames)
    detections = _predict(checkpoint_path, easy_dataset, frames,
                          batch_size=info["config"]["batch_size"], threads=info["torch_threads"])
    coco_map, coco_map50 = _coco_ap(truth, detections)
    assert coco_map == pytest.approx(float(row["map"]), abs=MAP_TOLERANCE)
    assert coco_map50 == pytest.approx(float(row["map50"]), abs=MAP_TOLERANCE)

    # The comparison can tell: boxes left at the detector's 2/3 input scale, or labels one off,
    # score far from what the run logged.
    shrunk = [{**d, "bbox": [v * MIN_SIZE / FRAME_SIZE[0] for v in d["bbox"]]}
              for d in detections]
    assert _coco_ap(truth, shrunk)[1] < float(row["map50"]) - 0.3
    off_by_one = [{**d, "category_id": d["category_id"] + 1} for d in detections]
    truth_two_categories = {**truth, "categories": [{"id": 1}, {"id": 2}]}
    assert _coco_ap(truth_two_categories, off_by_one) == (0.0, 0.0)


# -- ASHA --------------------------------------------------------------------------------------
def test_asha_stops_the_lr_that_cannot_learn(asha_run):
    bad_rows, good_rows = epoch_rows(asha_run / BAD), epoch_rows(asha_run / GOOD)
    # The precondition of the fixture's reasoning: one trial at a time, the good one first
    # (its last epoch ended, by its row's whole-second timestamp, before the bad one began).
    good_ended = datetime.fromisoformat(good_rows[-1]["timestamp"]).timestamp()
    assert good_ended <= training_info(asha_run / BAD)["train_started_at"]

    assert 1 <= len(bad_rows) < EPOCHS
    assert float(bad_rows[0]["learning_rate"]) == pytest.approx(LR * 1e-5)
    assert [int(r["epoch"]) for r in good_rows] == list(range(1, EPOCHS + 1))
    # Stopped where it fell below the good trial at the same epoch.
    last = len(bad_rows) - 1
    assert float(bad_rows[last]["map"]) < float(good_rows[last]["map"])

    summary = _summary(asha_run)
    status = {r["trial"]: r["status"] for r in summary["results"]}
    assert status[BAD] == "stopped"
    assert summary["best_lr_per_backbone"][BACKBONE]["lr"] == pytest.approx(LR)
    assert summary["best_lr_per_backbone"][BACKBONE]["trial"] == GOOD
    # Chosen by each trial's best-mAP epoch, not its lowest-loss one.
    assert summary["best_lr_per_backbone"][BACKBONE]["map"] == max(
        r["best_map"] for r in summary["results"] if r["best_map"] is not None)


def test_the_asha_trial_that_ran_every_epoch_completed(asha_run):
    assert len(epoch_rows(asha_run / GOOD)) == EPOCHS  # it did run them all
    assert training_info(asha_run / GOOD)["status"] == "completed"
    assert (asha_run / GOOD / "checkpoints" / f"{BACKBONE}_final_complete.pth").is_file()
    summary = _summary(asha_run)
    assert {r["trial"]: r["status"] for r in summary["results"]}[GOOD] == "completed"
    assert summary["num_succeeded"] == 1
