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


def _cocoeval_stats(truths, predictions, sizes):
    """pycocotools run here, on COCO dicts built here."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = [{"id": i, "height": h, "width": w} for i, (h, w) in enumerate(sizes)]
    annotations, detections = [], []
    for i, (truth, predicted) in enumerate(zip(truths, predictions)):
        for (x1, y1, x2, y2), label in zip(truth["boxes"], truth["labels"]):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "iscrowd": 0,
                                "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": float((x2 - x1) * (y2 - y1))})
        for (x1, y1, x2, y2), label, score in zip(predicted["boxes"], predicted["labels"],
                                                  predicted["scores"]):
            detections.append({"image_id": i, "category_id": int(label), "score": float(score),
                               "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {"images": images, "annotations": annotations,
                        "categories": [{"id": 1}, {"id": 2}]}
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(detections), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def test_coco_report_matches_pycocotools_and_breaks_down_by_class():
    from crossdet_ray.engine.evaluate import coco_report

    truths = [dict(t) for t in TRUTHS]
    truths[1] = {"boxes": np.array([[5, 5, 30, 35], [40, 40, 70, 75]], np.float32),
                 "labels": np.array([1, 2])}
    predictions = _predictions(3.0)
    predictions[1] = {"boxes": truths[1]["boxes"] + np.float32(1.0),
                      "labels": np.array([1, 1]), "scores": np.array([0.8, 0.6], np.float32)}
    report = coco_report(truths, predictions, SIZES, num_classes=2)
    stats = _cocoeval_stats(truths, predictions, SIZES)
    assert report.map == pytest.approx(stats[0])
    assert report.map50 == pytest.approx(stats[1])
    assert report.ar100 == pytest.approx(stats[8])
    for value, expected in zip((report.map_small, report.map_medium, report.map_large),
                               stats[3:6]):
        assert value == (None if expected < 0 else pytest.approx(expected))
    assert set(report.per_class) == {1, 2}
    assert report.per_class[2] == {"ap": 0.0, "ap50": 0.0}  # class 2 was never predicted
    # Two classes, so mAP is the mean of the per-class APs.
    assert report.map == pytest.approx((report.per_class[1]["ap"] + 0.0) / 2)
    assert len(report.pr_recall) == len(report.pr_precision) == 101


def test_perfect_predictions_have_a_flat_pr_curve_at_one():
    from crossdet_ray.engine.evaluate import coco_report

    report = coco_report(TRUTHS, _predictions(0.0), SIZES, num_classes=1)
    assert report.pr_precision == [1.0] * 101
    assert report.per_class == {1: {"ap": pytest.approx(1.0), "ap50": pytest.approx(1.0)}}


def test_nothing_detected_scores_zero_for_the_sizes_present():
    from crossdet_ray.engine.evaluate import coco_report

    empty = [{"boxes": np.zeros((0, 4)), "labels": np.zeros(0), "scores": np.zeros(0)}] * 2
    report = coco_report(TRUTHS, empty, SIZES, num_classes=1)
    # TRUTHS' boxes are 30x40, 40x50 and 25x30 px: medium, medium, small; none large.
    assert (report.map_small, report.map_medium, report.map_large) == (0.0, 0.0, None)
    assert report.per_class == {1: {"ap": 0.0, "ap50": 0.0}}
