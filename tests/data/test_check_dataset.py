"""check_dataset: the preflight's report, and a DatasetError naming the file for each problem."""

import dataclasses
import json
import logging

import numpy as np
import pytest

from crossdet_ray.data import DatasetError, DatasetReport, NpyYoloDataset, check_dataset


def test_report_counts_and_skipped_reasons(builder):
    builder.labelled("a", "0 0.5 0.5 0.2 0.2", "1 0.2 0.2 0.1 0.1", height=40, width=60)
    builder.labelled("b", "3 0.5 0.5 0.2 0.2", height=32, width=100, dtype=np.uint16)
    builder.labelled("c", height=50, width=30)
    builder.frame("d_no_label")
    builder.frame("e_empty")
    builder.label("e_empty")
    report = check_dataset(builder.root)
    assert isinstance(report, DatasetReport)
    assert report.num_images == 5
    assert report.num_usable == 3
    assert report.num_boxes == 4
    assert report.classes == [0, 1, 3]
    assert report.num_classes == 4
    assert (report.num_train, report.num_test) == (2, 1)
    assert report.skipped == [("d_no_label.npy", "no label file"),
                              ("e_empty.npy", "empty label file")]
    assert (report.min_height, report.max_height) == (32, 50)
    assert (report.min_width, report.max_width) == (30, 100)
    assert report.dtypes == ["uint16", "uint8"]
    assert any("2 frames are not used" in w for w in report.warnings)
    json.dumps(dataclasses.asdict(report))  # the launcher stores it as JSON
    assert "3 usable frames of 5" in report.summary()


def test_report_agrees_with_the_dataset(builder):
    for i in range(9):
        builder.labelled(f"f{i}", *["0 0.5 0.5 0.2 0.2"] * (i % 3 + 1))
    report = check_dataset(builder.root)
    train = NpyYoloDataset(builder.root, "train")
    test = NpyYoloDataset(builder.root, "test")
    assert (report.num_train, report.num_test) == (len(train), len(test))
    assert report.num_boxes == train.num_boxes + test.num_boxes
    assert report.num_classes == train.num_classes


def test_clipped_and_zero_area_boxes_are_reported(builder, caplog):
    builder.labelled("a", "0 0.05 0.5 0.104 0.1", "0 0.5 0.5 0.0 0.2", "0 0.5 0.5 0.3 0.3",
                     "0 0.5 0.5 1.5 0.2")
    with caplog.at_level(logging.WARNING, logger="crossdet_ray.data"):
        report = check_dataset(builder.root)
    assert report.num_boxes == 3
    text = "\n".join(report.warnings)
    assert "2 boxes reach past the frame edge" in text
    assert "1 of them by more than" in text and "a.npy" in text
    assert "1 zero-area boxes are dropped (first in a.npy)" in text
    assert caplog.records  # the warnings are logged too


def test_label_rounding_at_the_edge_is_not_reported_as_clipping(builder):
    builder.labelled("a", "0 0.050000 0.5 0.100001 0.1", "0 0.949999 0.5 0.100001 0.1")
    report = check_dataset(builder.root)
    assert not any("clipped" in w for w in report.warnings)


def test_orphan_labels_and_broken_unused_frames_only_warn(builder):
    builder.labelled("good")
    builder.label("orphan", "0 0.5 0.5 0.1 0.1")
    (builder.images / "unused.npy").write_bytes(b"garbage")
    report = check_dataset(builder.root)
    assert report.num_usable == 1
    assert any("1 label files match no frame" in w for w in report.warnings)
    assert any("unused frames are unreadable" in w and "unused.npy" in w
               for w in report.warnings)


# -- errors ------------------------------------------------------------------------------------
def test_missing_data_dir(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder not found"):
        check_dataset(tmp_path / "nowhere")


@pytest.mark.parametrize("folder", ["images", "labels"])
def test_missing_images_or_labels_folder(tmp_path, folder):
    (tmp_path / ("labels" if folder == "images" else "images")).mkdir()
    with pytest.raises(DatasetError, match=f"{folder}: folder not found"):
        check_dataset(tmp_path)


def test_empty_images_folder(builder):
    with pytest.raises(DatasetError, match="no usable frame.*holds no .npy frame"):
        check_dataset(builder.root)


def test_no_usable_frame(builder):
    builder.frame("a")
    builder.frame("b")
    builder.label("b")
    builder.label("a_typo", "0 0.5 0.5 0.1 0.1")
    with pytest.raises(DatasetError, match="no usable frame") as raised:
        check_dataset(builder.root)
    assert "do the file names match" in str(raised.value)


def test_unreadable_npy(builder):
    builder.label("bad", "0 0.5 0.5 0.1 0.1")
    (builder.images / "bad.npy").write_bytes(b"this is not numpy")
    with pytest.raises(DatasetError, match="bad.npy: not a readable .npy file"):
        check_dataset(builder.root)


def test_empty_npy_file(builder):
    builder.label("bad", "0 0.5 0.5 0.1 0.1")
    (builder.images / "bad.npy").write_bytes(b"")
    with pytest.raises(DatasetError, match="bad.npy: not a readable .npy file"):
        check_dataset(builder.root)


def test_truncated_npy(builder):
    path = builder.labelled("cut", height=20, width=20)
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    with pytest.raises(DatasetError, match=r"cut.npy: truncated.*copy the file again"):
        check_dataset(builder.root)


def test_truncated_npy_header(builder):
    path = builder.labelled("cut")
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(DatasetError, match="cut.npy: not a readable .npy file"):
        check_dataset(builder.root)


@pytest.mark.parametrize("shape", [(16, 16, 3), (16, 16), (16, 16, 5, 1), (5, 16, 16)])
def test_wrong_shape(builder, shape):
    builder.labelled("odd", array=np.zeros(shape, np.uint8))
    with pytest.raises(DatasetError, match=r"odd.npy: array shape .* is not \(H, W, 5\)"):
        check_dataset(builder.root)


@pytest.mark.parametrize("dtype", [np.int16, np.uint32, np.int8, bool, np.complex64])
def test_unsupported_dtype(builder, dtype):
    builder.labelled("odd", array=np.zeros((8, 8, 5), dtype))
    with pytest.raises(DatasetError, match="odd.npy: dtype .* is not supported"):
        check_dataset(builder.root)


@pytest.mark.parametrize("line,fragment", [
    ("0 0.5 0.5 0.1", "expected 5 fields"),
    ("0 0.5 0.5 0.1 0.1 0.9", "expected 5 fields"),
    ("person 0.5 0.5 0.1 0.1", "not all fields are numbers"),
    ("0 0.5 0,5 0.1 0.1", "not all fields are numbers"),
    ("0 nan 0.5 0.1 0.1", "non-finite"),
    ("-1 0.5 0.5 0.1 0.1", "negative class id"),
    ("1.5 0.5 0.5 0.1 0.1", "is not an integer"),
])
def test_bad_label_line_names_file_and_line(builder, line, fragment):
    builder.labelled("frame", "0 0.5 0.5 0.2 0.2", "", line)
    with pytest.raises(DatasetError, match=fragment) as raised:
        check_dataset(builder.root)
    assert "frame.txt, line 3" in str(raised.value)


def test_dataset_raises_the_same_errors(builder):
    builder.labelled("frame", "0 0.5 0.5")
    with pytest.raises(DatasetError, match="frame.txt, line 1"):
        NpyYoloDataset(builder.root)


def test_integral_float_class_is_accepted(builder):
    builder.labelled("frame", "1.0 0.5 0.5 0.2 0.2")
    assert check_dataset(builder.root).classes == [1]


def test_dataset_error_is_a_value_error():
    assert issubclass(DatasetError, ValueError)
