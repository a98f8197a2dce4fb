"""The synthetic dataset: deterministic, in the real format, and the X stream matters at night."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crossdet_ray.data import NpyYoloDataset, check_dataset
from crossdet_ray.data.synthetic import generate_dataset, is_night, main

SMALL = [(64, 64)]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_same_seed_gives_identical_bytes(tmp_path):
    first = _files(generate_dataset(tmp_path / "a", 6, seed=3, sizes=SMALL))
    second = _files(generate_dataset(tmp_path / "b", 6, seed=3, sizes=SMALL))
    assert len(first) == 2 * 6 + 1  # frames, labels, synthetic.json
    assert first == second


def test_different_seeds_differ(tmp_path):
    first = _files(generate_dataset(tmp_path / "a", 4, seed=0, sizes=SMALL))
    second = _files(generate_dataset(tmp_path / "b", 4, seed=1, sizes=SMALL))
    assert first.keys() == second.keys()
    differing = [name for name in first if first[name] != second[name]]
    assert len([n for n in differing if n.startswith("images")]) == 4
    assert any(n.startswith("labels") for n in differing)


def test_frames_depend_only_on_seed_and_index(tmp_path):
    small = _files(generate_dataset(tmp_path / "a", 3, seed=5, sizes=SMALL))
    large = _files(generate_dataset(tmp_path / "b", 5, seed=5, sizes=SMALL))
    for name, data in small.items():
        if name != "synthetic.json":
            assert large[name] == data


def test_output_passes_the_preflight_and_loads(tmp_path):
    root = generate_dataset(tmp_path / "syn", 12, seed=0, sizes=[(64, 64), (48, 80)])
    report = check_dataset(root)
    assert report.num_images == report.num_usable == 12
    assert (report.num_train, report.num_test) == (9, 3)
    assert report.classes == [0] and report.num_classes == 1
    assert report.dtypes == ["uint8"]
    assert report.warnings == []
    assert 12 <= report.num_boxes <= 60
    assert {(report.min_height, report.max_height), (report.min_width, report.max_width)} <= {
        (48, 64), (64, 80), (64, 64), (48, 48), (80, 80)}
    dataset = NpyYoloDataset(root, split="all")
    for image, target in (dataset[i] for i in range(len(dataset))):
        height, width = image.shape[-2:]
        boxes = target["boxes"]
        assert 1 <= len(boxes) <= 5
        assert target["labels"].eq(1).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert boxes[:, 0].min() >= 0 and boxes[:, 2].max() <= width
        assert boxes[:, 1].min() >= 0 and boxes[:, 3].max() <= height


def test_default_sizes_are_the_real_datasets(tmp_path):
    root = generate_dataset(tmp_path / "syn", 6, seed=2)
    sizes = {np.load(p, mmap_mode="r").shape for p in (root / "images").glob("*.npy")}
    assert sizes <= {(301, 391, 5), (304, 400, 5), (240, 320, 5), (480, 640, 5), (200, 200, 5)}


def test_day_and_night_are_about_half_each(tmp_path):
    root = generate_dataset(tmp_path / "syn", 10, seed=0, sizes=SMALL)
    names = sorted(p.stem for p in (root / "images").glob("*.npy"))
    assert sum(name.endswith("_night") for name in names) == 5
    assert sum(name.endswith("_day") for name in names) == 5
    metadata = json.loads((root / "synthetic.json").read_text())
    assert (metadata["num_day"], metadata["num_night"]) == (5, 5)
    assert [is_night(i, 0.0) for i in range(4)] == [False] * 4
    assert [is_night(i, 1.0) for i in range(4)] == [True] * 4


def test_several_classes(tmp_path):
    root = generate_dataset(tmp_path / "syn", 20, seed=0, sizes=SMALL, num_classes=3)
    report = check_dataset(root)
    assert set(report.classes) <= {0, 1, 2} and len(report.classes) >= 2


@pytest.mark.parametrize("options", [{"num_images": 0}, {"night_fraction": 1.5},
                                     {"num_classes": 0}, {"sizes": [(8, 8)]}, {"seed": -1}])
def test_bad_options_are_rejected(tmp_path, options):
    arguments = {"num_images": 2, **options}
    with pytest.raises(ValueError):
        generate_dataset(tmp_path / "syn", arguments.pop("num_images"), **arguments)


def _contrasts(root: Path, channels: slice) -> dict[str, list[float]]:
    """|mean inside an object - mean of a 3 px ring around its box| per object, by scene."""
    found = {"day": [], "night": []}
    for frame_path in sorted((root / "images").glob("*.npy")):
        pixels = np.load(frame_path)[..., channels].astype(np.float64).mean(axis=-1)
        height, width = pixels.shape
        lines = (root / "labels" / f"{frame_path.stem}.txt").read_text().split("\n")
        boxes = []
        for line in filter(None, lines):
            _, xc, yc, w, h = map(float, line.split())
            boxes.append([round((xc - w / 2) * width), round((yc - h / 2) * height),
                          round((xc + w / 2) * width), round((yc + h / 2) * height)])
        inside_any = np.zeros_like(pixels, dtype=bool)
        for x1, y1, x2, y2 in boxes:
            inside_any[y1:y2, x1:x2] = True
        for x1, y1, x2, y2 in boxes:
            # The middle half of the box lies inside the object's ellipse.
            inner = pixels[y1 + (y2 - y1) // 4: y2 - (y2 - y1) // 4,
                           x1 + (x2 - x1) // 4: x2 - (x2 - x1) // 4]
            ring = np.zeros_like(inside_any)
            ring[max(y1 - 3, 0):y2 + 3, max(x1 - 3, 0):x2 + 3] = True
            ring &= ~inside_any
            if inner.size and ring.any():
                found[frame_path.stem.split("_")[1]].append(abs(inner.mean()
                                                                - pixels[ring].mean()))
    return found


def test_objects_show_in_rgb_by_day_only_but_in_thermal_always(tmp_path):
    root = generate_dataset(tmp_path / "syn", 24, seed=0, sizes=[(96, 96)])
    rgb, thermal = _contrasts(root, slice(0, 3)), _contrasts(root, slice(3, 4))
    assert min(len(values) for values in rgb.values()) >= 10
    assert np.median(rgb["day"]) > 40  # grey levels
    assert np.median(rgb["night"]) < 4
    assert max(rgb["night"]) < 10
    assert np.median(thermal["day"]) > 50 and np.median(thermal["night"]) > 50
    assert min(thermal["day"] + thermal["night"]) > 25


def test_events_outline_objects(tmp_path):
    root = generate_dataset(tmp_path / "syn", 8, seed=0, sizes=[(96, 96)])
    in_boxes, background = [], []
    for frame_path in sorted((root / "images").glob("*.npy")):
        events = np.load(frame_path)[..., 4] > 0
        outside = np.ones_like(events)
        for line in filter(None, (root / "labels" / f"{frame_path.stem}.txt").read_text()
                           .split("\n")):
            _, xc, yc, w, h = map(float, line.split())
            x1, y1 = round((xc - w / 2) * 96), round((yc - h / 2) * 96)
            x2, y2 = round((xc + w / 2) * 96), round((yc + h / 2) * 96)
            in_boxes.append(events[y1:y2, x1:x2].mean())
            outside[y1:y2, x1:x2] = False
        background.append(events[outside].mean())
    # Outlines make events several times denser on objects than the sensor noise elsewhere.
    assert np.median(in_boxes) > 4 * np.mean(background)
    assert 0.002 < np.mean(background) < 0.05


def test_module_runs_from_the_command_line(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "crossdet_ray.data.synthetic", str(out), "--num-images", "3",
         "--seed", "4", "--sizes", "32x32", "40x48"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote 3 frames" in result.stdout
    expected = _files(generate_dataset(tmp_path / "library", 3, seed=4,
                                       sizes=[(32, 32), (40, 48)]))
    assert _files(out) == expected


def test_main_rejects_bad_sizes(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["out", "--sizes", "64by64"])
    assert raised.value.code == 2
    assert "HEIGHTxWIDTH" in capsys.readouterr().err


def test_the_generators_old_module_name_still_works():
    """`crossdet_ray.synthetic` (the name before it moved under data/) is the same generator,
    and says where it went."""
    import importlib
    import sys

    import crossdet_ray.data.synthetic as moved

    sys.modules.pop("crossdet_ray.synthetic", None)
    with pytest.warns(DeprecationWarning, match="crossdet_ray.data.synthetic"):
        old = importlib.import_module("crossdet_ray.synthetic")
    assert old.generate_dataset is moved.generate_dataset and old.main is moved.main
