"""experiments/predict.py: the boxes the engine's evaluation gives, in the frame's pixels, in
COCO's results format; user mistakes are one line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# Frames of 60 x 90 px resized to 80 x 120 by the checkpoint's --min-size 80 --max-size 120:
# a box not mapped back to the frame would be 4/3 too large.
FRAME_SIZE, MIN_SIZE, MAX_SIZE = (60, 90), 80, 120
SCORE_THRESHOLD = 0.05


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> Path:
    from crossdet_ray.data.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("predict_data"), 5, seed=3,
                            sizes=[FRAME_SIZE])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained test_mit (its random head scores boxes near 0.5, so there are many) saved
    as the engine saves checkpoints."""
    from crossdet_ray.config import TrainConfig
    from crossdet_ray.engine.train import build_model, build_optimizer
    from crossdet_ray.engine.checkpoint import build_checkpoint

    config = TrainConfig(min_size=MIN_SIZE, max_size=MAX_SIZE)
    model = build_model(config, "test_mit", num_classes=2)
    optimizer, scheduler = build_optimizer(config, model)
    path = tmp_path_factory.mktemp("predict_checkpoint") / "best_map_model.pth"
    torch.save(build_checkpoint(epoch=1, backbone="test_mit", model=model, optimizer=optimizer,
                                scheduler=scheduler, loss=1.0, best_loss=1.0, best_epoch=1,
                                config=config.to_dict(), history={}, num_classes=2), path)
    return path


@pytest.fixture(scope="module")
def predicted(frames, checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predictions")
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "predict.py"), str(checkpoint),
         str(frames / "images"), "--out", str(out), "--device", "cpu"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _model(checkpoint: Path) -> torch.nn.Module:
    from crossdet_ray.models import build_detector

    model = build_detector("test_mit", num_classes=2, min_size=MIN_SIZE, max_size=MAX_SIZE)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model_state_dict"])
    return model.eval()


def _by_frame(detections: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for entry in detections:
        grouped.setdefault(entry["image_id"], []).append(entry)
    return grouped


def _assert_same_detections(written: list[dict], boxes, labels, scores, where: str) -> None:
    """Every expected detection above the threshold is in `written` (same class, box within
    1e-3 px, score within 1e-5), and nothing else is."""
    expected = [(b, int(l), float(s)) for b, l, s in zip(boxes.tolist(), labels.tolist(),
                                                           scores.tolist())
                if s >= SCORE_THRESHOLD]
    assert len(written) == len(expected), where
    remaining = list(written)
    for box, label, score in expected:
        x1, y1, x2, y2 = box
        match = next((e for e in remaining if e["category_id"] == label
                      and abs(e["score"] - score) < 1e-5
                      and np.allclose(e["bbox"], [x1, y1, x2 - x1, y2 - y1], atol=1e-3)), None)
        assert match is not None, (where, box, score)
        remaining.remove(match)


def test_detections_are_the_engine_evaluations_boxes(frames, checkpoint, predicted):
    """The engine's evaluation path (crossdet_ray.engine.evaluate.predict over the dataset's
    own loader) gives the same boxes for the same frames."""
    from torch.utils.data import DataLoader

    from crossdet_ray.data import NpyYoloDataset, collate_detection
    from crossdet_ray.engine.evaluate import predict as evaluation_predictions

    written = _by_frame(json.loads((predicted / "detections.json").read_text()))
    dataset = NpyYoloDataset(frames, split="all")
    loader = DataLoader(dataset, batch_size=1, collate_fn=collate_detection)
    _, outputs, sizes = evaluation_predictions(_model(checkpoint), loader, torch.device("cpu"))
    assert sorted(written) == sorted(Path(f).stem for f in dataset.image_files)
    for name, output, size in zip(dataset.image_files, outputs, sizes):
        assert size == FRAME_SIZE
        _assert_same_detections(written[Path(name).stem], output["boxes"], output["labels"],
                                output["scores"], name)


def test_boxes_are_in_the_original_frames_pixels(frames, checkpoint, predicted):
    """The detector's stages run by hand on the resized frame, its boxes scaled back to the
    frame here: the same boxes as detections.json."""
    from crossdet_ray.data import NpyYoloDataset

    written = _by_frame(json.loads((predicted / "detections.json").read_text()))
    model = _model(checkpoint)
    dataset = NpyYoloDataset(frames, split="all")
    with torch.no_grad():
        for index, name in enumerate(dataset.image_files):
            frame = dataset[index][0]
            images, _ = model.transform([frame])
            resized_height, resized_width = images.image_sizes[0]
            assert (resized_height, resized_width) == (MIN_SIZE, MAX_SIZE)
            features = model.backbone(images.tensors)
            proposals, _ = model.rpn(images, features)
            detections, _ = model.roi_heads(features, proposals, images.image_sizes)
            height, width = FRAME_SIZE
            scale = torch.tensor([width / resized_width, height / resized_height] * 2)
            boxes = detections[0]["boxes"] * scale
            _assert_same_detections(written[Path(name).stem], boxes, detections[0]["labels"],
                                    detections[0]["scores"], name)


def test_detections_json_is_coco_results(frames, predicted):
    detections = json.loads((predicted / "detections.json").read_text())
    assert detections, "an untrained head scores boxes near 0.5: there must be detections"
    stems = {p.stem for p in (frames / "images").glob("*.npy")}
    height, width = FRAME_SIZE
    for entry in detections:
        assert set(entry) == {"image_id", "category_id", "bbox", "score"}
        assert entry["image_id"] in stems
        assert entry["category_id"] == 1  # the one class (YOLO 0) + 1, as in evaluation
        x, y, box_width, box_height = entry["bbox"]
        assert 0 <= x and 0 <= y and box_width >= 0 and box_height >= 0
        assert x + box_width <= width + 1e-3 and y + box_height <= height + 1e-3
        assert SCORE_THRESHOLD <= entry["score"] <= 1


def test_one_drawing_per_frame(frames, predicted):
    from PIL import Image

    drawings = sorted(p.stem for p in (predicted / "drawings").glob("*.png"))
    assert drawings == sorted(p.stem for p in (frames / "images").glob("*.npy"))
    with Image.open(next((predicted / "drawings").glob("*.png"))) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1]  # three panels wide


def _main(capsys, *argv: str) -> tuple[int, str]:
    from crossdet_ray.predict_cli import main

    code = main(list(argv))
    return code, capsys.readouterr().err


def test_user_mistakes_are_one_line_and_exit_2(frames, checkpoint, tmp_path, capsys):
    cases = [
        ((str(tmp_path / "missing.pth"), str(frames / "images")), "missing.pth"),
        ((str(checkpoint), str(tmp_path)), "holds no .npy frames"),
        ((str(checkpoint), str(tmp_path / "nowhere")), "nowhere"),
    ]
    # Bare weights load when the file's name says the backbone (mit_b0_final.pth); here it
    # does not, so nothing tells which network they belong to.
    weights_only = tmp_path / "weights.pth"
    torch.save(torch.load(checkpoint, weights_only=True)["model_state_dict"], weights_only)
    cases.append(((str(weights_only), str(frames / "images")), "cannot tell its backbone"))
    not_a_frame = tmp_path / "frames" / "bad.npy"
    not_a_frame.parent.mkdir()
    np.save(not_a_frame, np.zeros((8, 8, 3), np.uint8))  # three channels, not five
    cases.append(((str(checkpoint), str(not_a_frame)), "bad.npy"))
    for argv, fragment in cases:
        code, err = _main(capsys, *argv, "--out", str(tmp_path / "out"), "--no-drawings")
        lines = [line for line in err.splitlines() if "error:" in line]
        assert code == 2 and len(lines) == 1 and fragment in lines[0], (argv, err)
        assert "Traceback" not in err
