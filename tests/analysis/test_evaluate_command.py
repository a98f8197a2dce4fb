"""`experiments/evaluate.py RUN_DIR` as a user runs it, on a run directory made by hand
(tests/analysis/runs.py): two good trials, one with a damaged checkpoint, one that never
started. Its numbers are checked against pycocotools run here on its predictions and the
label files, and its report is opened in a real headless browser."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from crossdet_ray.analysis.cli import main
from tests.analysis.runs import SIZE, detector_checkpoint, write_run_config, write_trial
from tests.tune.helpers import ROOT, kill_session, ray_env

pytestmark = pytest.mark.ray

COLUMNS = ("trial", "backbone", "checkpoint", "epoch", "params", "model_size_mb", "map",
           "map50", "map75", "map_small", "map_medium", "map_large", "ar100",
           "infer_ms_per_image", "fps", "peak_memory_mb")
GOOD = ("test_mit", "test_mit_lr0.01")


def run_evaluate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The command in a Ray of its own (`--address local`), unless `args` name an address:
    without one it would join a cluster `ray start` runs on this machine."""
    if "--address" not in args:
        args = (*args, "--address", "local")
    process = subprocess.Popen([sys.executable, str(ROOT / "experiments" / "evaluate.py"), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=cwd, env=ray_env(), start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=400)
    finally:
        if process.poll() is None:
            process.kill()
        kill_session(process.pid)  # nothing it started outlives the test
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def evaluated(tiny_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    run_dir.mkdir()
    write_trial(run_dir, "test_mit", "test_mit", maps=[0.1, 0.3], seed=1)  # best mAP: epoch 2
    write_trial(run_dir, "test_mit_lr0.01", "test_mit", maps=[0.2, 0.1], seed=5)  # epoch 1
    broken = write_trial(run_dir, "broken", "test_mit", maps=[0.5], seed=9)
    epoch_file = broken / "checkpoints" / "epoch_001_loss_1.0000.pth"
    epoch_file.unlink()
    epoch_file.write_bytes(b"half a checkpoint")
    write_run_config(run_dir, tiny_dataset, [("test_mit", "test_mit"), ("test_mit_lr0.01", "test_mit"),
                                             ("broken", "test_mit"), ("mit_b1", "mit_b1")])
    result = run_evaluate(str(run_dir), cwd=run_dir.parent)
    out = run_dir / "evaluation"
    with open(out / "results.csv", newline="") as handle:
        rows = {row["trial"]: row for row in csv.DictReader(handle)}
    return {"run_dir": run_dir, "out": out, "result": result, "rows": rows,
            "json": json.loads((out / "results.json").read_text())}


def test_every_trial_has_a_row_with_every_column(evaluated):
    result = evaluated["result"]
    assert result.returncode == 1, result.stderr[-3000:]  # two trials failed
    from crossdet_ray.models import build_detector

    parameters = sum(p.numel() for p in build_detector("test_mit", 2).parameters())
    rows = evaluated["rows"]
    assert list(rows) == ["test_mit", "test_mit_lr0.01", "broken", "mit_b1"]
    header = list(next(iter(rows.values())))
    assert header[:len(COLUMNS)] == list(COLUMNS)
    for name in GOOD:
        row = rows[name]
        assert row["status"] == "ok"
        for column in COLUMNS:
            if column not in ("map_small", "map_medium", "map_large"):
                assert row[column] != "", (name, column)
        assert int(row["params"]) == parameters
        assert float(row["infer_ms_per_image"]) > 0
        assert float(row["fps"]) == pytest.approx(1000 / float(row["infer_ms_per_image"]))
        assert float(row["peak_memory_mb"]) > 0
    assert f"Report: {evaluated['out'] / 'report.html'}" in result.stdout


def test_best_map_epoch_is_evaluated(evaluated):
    rows = evaluated["rows"]
    run_dir = evaluated["run_dir"]
    assert rows["test_mit"]["epoch"] == "2"
    assert rows["test_mit"]["checkpoint"] == str(
        run_dir / "test_mit" / "checkpoints" / "epoch_002_loss_0.5000.pth")
    assert rows["test_mit_lr0.01"]["epoch"] == "1"
    assert rows["test_mit_lr0.01"]["checkpoint"].endswith("epoch_001_loss_1.0000.pth")


def test_failed_trials_are_listed_and_the_others_evaluated(evaluated):
    rows = evaluated["rows"]
    assert rows["broken"]["status"] == "failed"
    assert "epoch_001_loss_1.0000.pth cannot be read" in rows["broken"]["error"]
    assert rows["mit_b1"]["status"] == "failed"
    assert "never started" in rows["mit_b1"]["error"]
    report = (evaluated["out"] / "report.html").read_text()
    failures = report.split("<h2>Failed trials</h2>")[1].split("<h2>")[0]
    assert "broken" in failures and "mit_b1" in failures and "cannot be read" in failures


def _test_split_truth(data_dir: Path) -> dict:
    """COCO ground truth of the run's test split, from the label files and scikit-learn's
    split (what the reference used), with none of the package's code."""
    from sklearn.model_selection import train_test_split

    labelled = sorted(p.stem for p in (data_dir / "labels").glob("*.txt")
                      if p.read_text().strip() and (data_dir / "images" / f"{p.stem}.npy").exists())
    _, test = train_test_split(labelled, test_size=0.2, random_state=42)
    images, annotations = [], []
    for image_id, stem in enumerate(test):
        height, width = np.load(data_dir / "images" / f"{stem}.npy", mmap_mode="r").shape[:2]
        images.append({"id": image_id, "file": stem, "height": height, "width": width})
        for line in (data_dir / "labels" / f"{stem}.txt").read_text().split("\n"):
            if not line.strip():
                continue
            class_id, xc, yc, w, h = (float(v) for v in line.split())
            x1, y1 = max((xc - w / 2) * width, 0), max((yc - h / 2) * height, 0)
            x2, y2 = min((xc + w / 2) * width, width), min((yc + h / 2) * height, height)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(class_id) + 1, "iscrowd": 0,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 1}, {"id": 2}]}


def _pycocotools_stats(truth: dict, predictions: list[dict]) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = {image["file"]: image["id"] for image in truth["images"]}
    coco = COCO()
    coco.dataset = truth
    coco.createIndex()
    detections = coco.loadRes([{**p, "image_id": ids[p["image_id"]]} for p in predictions])
    evaluator = COCOeval(coco, detections, iouType="bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats


def test_metrics_equal_pycocotools_on_its_predictions(evaluated, tiny_dataset):
    truth = _test_split_truth(Path(tiny_dataset))
    assert len(truth["images"]) == 3
    for name in GOOD:
        row = evaluated["rows"][name]
        predictions = json.loads((evaluated["out"] / "predictions" / f"{name}.json").read_text())
        assert {p["image_id"] for p in predictions} <= {i["file"] for i in truth["images"]}
        stats = _pycocotools_stats(truth, predictions)
        assert stats[1] > 0, "the crafted detector should hit something"
        assert float(row["map50"]) == pytest.approx(stats[1], abs=1e-9)
        assert float(row["map"]) == pytest.approx(stats[0], abs=1e-9)
        assert float(row["map75"]) == pytest.approx(max(stats[2], 0), abs=1e-9)
        assert float(row["ar100"]) == pytest.approx(stats[8], abs=1e-9)


def test_predictions_are_the_checkpoints_own(evaluated, tiny_dataset):
    """The predictions file holds what the checkpoint's model gives, run here on the frames."""
    from crossdet_ray.models import build_detector

    row = evaluated["rows"]["test_mit"]
    checkpoint = torch.load(row["checkpoint"], weights_only=True)
    model = build_detector("test_mit", num_classes=2, min_size=SIZE, max_size=SIZE)
    model.load_state_dict(checkpoint["model_state_dict"])
    model.eval()
    predictions = json.loads((evaluated["out"] / "predictions" / "test_mit.json").read_text())
    stem = predictions[0]["image_id"]
    frame = np.load(Path(tiny_dataset) / "images" / f"{stem}.npy")
    with torch.no_grad():
        output = model([torch.from_numpy(frame.transpose(2, 0, 1) / 255.0).float()])[0]
    mine = [p for p in predictions if p["image_id"] == stem]
    assert len(mine) == len(output["scores"])
    boxes = output["boxes"].numpy()
    expected = np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0],
                         boxes[:, 3] - boxes[:, 1]], axis=1)
    np.testing.assert_allclose([p["bbox"] for p in mine], expected, atol=1e-3)
    np.testing.assert_allclose([p["score"] for p in mine], output["scores"].numpy(), atol=1e-5)


def test_each_trial_ran_with_its_share_and_was_timed_alone(evaluated):
    trials = {row["trial"]: row for row in evaluated["json"]["trials"]}
    windows = []
    for name in GOOD:
        assert trials[name]["resources"] == {"CPU": 1.0}  # run_config.json's share
        windows.append(trials[name]["timing_window"])
    accuracy_end = max(trials[name]["accuracy_window"][1] for name in GOOD)
    first, second = sorted(windows)
    assert first[0] >= accuracy_end and first[1] <= second[0]


def test_tables_and_pictures(evaluated):
    out = evaluated["out"]
    with open(out / "per_class_ap.csv", newline="") as handle:
        per_class = list(csv.DictReader(handle))
    assert [(r["trial"], r["class_id"]) for r in per_class] == [(n, "0") for n in GOOD]
    for row in per_class:  # one class: its AP is the trial's mAP
        assert float(row["ap"]) == pytest.approx(float(evaluated["rows"][row["trial"]]["map"]))
    for picture in ("pr_curves.png", "pareto.png", "curves.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
    drawn = {name: sorted(p.name for p in (out / "detections" / name).glob("*.png"))
             for name in GOOD}
    samples = {name: [d["frame"] for d in evaluated["json"]["detections"][name]
                      if d["kind"] == "sample"] for name in GOOD}
    assert samples["test_mit"] == samples["test_mit_lr0.01"] and len(samples["test_mit"]) == 3
    for name in GOOD:
        assert drawn[name] == sorted(f"{d['frame']}.png"
                                     for d in evaluated["json"]["detections"][name])
    choice = evaluated["json"]["choice"]
    by_map = max(GOOD, key=lambda n: float(evaluated["rows"][n]["map"]))
    assert choice["most_accurate"] == by_map


def test_report_embeds_its_pictures(evaluated):
    report = (evaluated["out"] / "report.html").read_text()
    pictures = 3 + sum(len(d) for d in evaluated["json"]["detections"].values())
    assert report.count('src="data:image/png;base64,') == pictures
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", report)
    assert "<script" not in report and "<link" not in report


def _browser() -> str:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("no headless Chromium: apt-get install chromium-headless-shell (setup.sh does "
                "it as root)")


def test_report_in_a_browser(evaluated, tmp_path):
    """What a person sees: the images decode (naturalWidth > 0) and the screenshot shows them."""
    from PIL import Image

    page = tmp_path / "report.html"
    # A copy that writes each image's decoded width into the page once everything loaded.
    page.write_text((evaluated["out"] / "report.html").read_text().replace(
        "</body>", "<pre id='widths'></pre><script>window.addEventListener('load', () => {"
        "document.getElementById('widths').textContent = 'widths:' + Array.from("
        "document.images).map(i => i.naturalWidth).join(',');});</script></body>"))
    browser = _browser()
    common = [browser, "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run(common + ["--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120)
    widths = re.search(r"widths:([0-9,]*)", dom.stdout)
    assert widths, dom.stderr[-2000:]
    widths = [int(w) for w in widths.group(1).split(",")]
    assert len(widths) == 3 + sum(len(d) for d in evaluated["json"]["detections"].values())
    assert min(widths) > 0

    shot = tmp_path / "report.png"
    subprocess.run(common + [f"--screenshot={shot}", "--window-size=1400,3000",
                             (evaluated["out"] / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (3000, 1400)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 500  # the frames and plots, not a blank or text-only page
    assert (pixels < 250).any(axis=2).mean() > 0.1


# -- a folder of checkpoints, and the user's mistakes ------------------------------------------
def test_a_folder_of_checkpoints(tiny_dataset, tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    # A bare state dict, as <backbone>_final.pth is: the backbone comes from the file name.
    torch.save(detector_checkpoint(3, 1)["model_state_dict"], folder / "test_mit_final.pth")
    (folder / "notes.txt").write_text("not a checkpoint")
    # In this process: the command as a subprocess is the run directory's test above.
    code = main([str(folder), "--checkpoint-pattern", "*.pth", "--data", tiny_dataset,
                 "--min-size", str(SIZE), "--max-size", str(SIZE), "--out",
                 str(tmp_path / "out"), "--address", "local"])
    assert code == 0, capsys.readouterr().err[-3000:]
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["trial"], r["backbone"], r["status"]) for r in rows] == [
        ("test_mit_final", "test_mit", "ok")]
    assert int(rows[0]["frames"]) == 12  # --data: every labelled frame
    assert not math.isnan(float(rows[0]["map50"]))
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    drawings = summary["detections"]["test_mit_final"]
    errors = summary["frame_errors"]["test_mit_final"]
    sample = [d["frame"] for d in drawings if d["kind"] == "sample"]
    worst = [d["frame"] for d in drawings if d["kind"] == "worst"]
    assert len(errors) == 12 and len(sample) == 4
    # The worst frames: the most errors among the frames not in the sample.
    others = sorted((f for f in errors if f not in sample), key=lambda f: (-errors[f], f))
    assert worst == others[:3]
    assert {p.stem for p in (tmp_path / "out" / "detections" / "test_mit_final").glob("*.png")} \
        == set(sample + worst)


@pytest.mark.parametrize("args, message", [
    (["{tmp}/no_such_run"], "no such run directory"),
    (["{run}", "--checkpoint", "newest"], "--checkpoint 'newest': choose one of best_map"),
    (["{run}", "--data", "{tiny}", "--checkpoint-pattern", "*.ckpt"],
     "no file matches --checkpoint-pattern '*.ckpt'"),
    (["{run}"], "holds no run_config.json to name its data: pass --data DIR"),
    (["{run}", "--min-size", "0", "--data", "{tiny}"], "--min-size must be at least 1"),
])
def test_user_mistakes_are_one_line_and_exit_2(args, message, tmp_path, tiny_dataset, capsys):
    run = tmp_path / "folder"
    run.mkdir()
    code = main([a.format(tmp=tmp_path, run=run, tiny=tiny_dataset) for a in args])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.count("\n") == 1 and message in captured.err, captured.err
    assert not (run / "evaluation").exists()


def test_flag_mistakes_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--min-size", "big"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert captured.err.count("\n") == 1 and "invalid int value: 'big'" in captured.err
