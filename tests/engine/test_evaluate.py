import numpy as np
import pytest

from crossdet_ray.engine.evaluate import coco_metrics

SIZES = [(100, 120), (80, 90)]
TRUTHS = [
    {"boxes": np.array([[10, 10, 40, 50], [60, 20, 100, 70]], np.float32), "labels": np.array([1, 1])},
    {"boxes": np.array([[5, 5, 30, 35]], np.float32), "labels": np.array([1])},
]


def _predictions(offset: float):
    return [{"boxes": t["boxes"] + offset, "labels": t["labels"],
             "scores": np.full(len(t["labels"]), 0.9, np.float32)} for t in TRUTHS]


def test_perfect_predictions_score_one():
    metrics = coco_metrics(TRUTHS, _predictions(0.0), SIZES, num_classes=1)
    assert metrics.map == pytest.approx(1.0)
    assert metrics.map50 == pytest.approx(1.0)
    assert metrics.map75 == pytest.approx(1.0)


def test_shifted_predictions_score_lower():
    perfect = coco_metrics(TRUTHS, _predictions(0.0), SIZES, num_classes=1)
    shifted = coco_metrics(TRUTHS, _predictions(6.0), SIZES, num_classes=1)
    assert shifted.map < perfect.map
    assert 0.0 <= shifted.map < 1.0


def test_wrong_class_scores_zero():
    predictions = _predictions(0.0)
    for p in predictions:
        p["labels"] = p["labels"] + 1
    assert coco_metrics(TRUTHS, predictions, SIZES, num_classes=2).map == 0.0


def test_no_detections_scores_zero():
    empty = [{"boxes": np.zeros((0, 4)), "labels": np.zeros(0), "scores": np.zeros(0)}] * 2
    assert coco_metrics(TRUTHS, empty, SIZES, num_classes=1).map == 0.0
