"""NpyYoloDataset: pixel scaling, targets, skipped frames, memory mapping, collation."""

import logging
import pickle

import numpy as np
import pytest
import torch

import crossdet_ray.data.dataset as dataset_module
from crossdet_ray.data import NpyYoloDataset, collate_detection


def _only_item(builder, **options):
    dataset = NpyYoloDataset(builder.root, split="all", **options)
    assert len(dataset) == 1
    return dataset, dataset[0]


def test_uint8_frames_scale_by_255(builder):
    array = np.zeros((8, 12, 5), np.uint8)
    array[0, 0] = 255
    array[1, 2] = [51, 0, 102, 204, 1]
    builder.labelled("a", array=array)
    _, (image, _) = _only_item(builder)
    assert image.dtype == torch.float32 and image.shape == (5, 8, 12)
    assert image.is_contiguous()
    assert torch.all(image[:, 0, 0] == 1.0)
    assert torch.allclose(image[:, 1, 2], torch.tensor([0.2, 0.0, 0.4, 0.8, 1 / 255]))
    assert image.min() >= 0.0 and image.max() <= 1.0


def test_uint16_frames_scale_by_65535(builder):
    array = np.zeros((6, 7, 5), np.uint16)
    array[..., 3] = 65535
    array[2, 3, 0] = 255  # an 8-bit value in a 16-bit frame stays small
    builder.labelled("a", array=array)
    _, (image, _) = _only_item(builder)
    assert torch.all(image[3] == 1.0)
    assert image[0, 2, 3] == pytest.approx(255 / 65535)


def test_float_frames_are_taken_as_stored(builder):
    array = np.full((4, 5, 5), 0.25, np.float64)
    builder.labelled("a", array=array)
    _, (image, _) = _only_item(builder)
    assert image.dtype == torch.float32
    assert torch.all(image == 0.25)


def test_channel_order_is_kept(builder):
    array = np.zeros((4, 4, 5), np.uint8)
    for channel in range(5):
        array[..., channel] = 10 * (channel + 1)
    builder.labelled("a", array=array)
    _, (image, _) = _only_item(builder)
    assert image[:, 0, 0].mul(255).round().tolist() == [10, 20, 30, 40, 50]


def test_boxes_become_xyxy_pixels_and_labels_shift_by_one(builder):
    builder.labelled("a", "0 0.5 0.5 0.5 0.25", "2 0.25 0.75 0.1 0.2", height=40, width=80)
    dataset, (_, target) = _only_item(builder)
    assert target["boxes"].dtype == torch.float32
    assert target["labels"].dtype == torch.int64
    assert torch.allclose(target["boxes"], torch.tensor([[20.0, 15.0, 60.0, 25.0],
                                                         [16.0, 26.0, 24.0, 34.0]]))
    assert target["labels"].tolist() == [1, 3]
    assert target["image_id"].dtype == torch.int64 and target["image_id"].ndim == 0
    assert dataset.num_classes == 3


def test_image_id_is_the_index_in_the_split(builder):
    for i in range(10):
        builder.labelled(f"f{i}")
    test_split = NpyYoloDataset(builder.root, split="test")
    assert [int(test_split[i][1]["image_id"]) for i in range(len(test_split))] == [0, 1]


def test_boxes_slightly_outside_are_clipped(builder):
    builder.labelled("a", "0 0.05 0.5 0.2 0.2", "0 0.95 0.98 0.12 0.1", height=100, width=100)
    _, (_, target) = _only_item(builder)
    assert torch.allclose(target["boxes"], torch.tensor([[0.0, 40.0, 15.0, 60.0],
                                                         [89.0, 93.0, 100.0, 100.0]]))


def test_zero_area_boxes_are_dropped_with_a_warning(builder, caplog):
    builder.labelled("a", "0 0.5 0.5 0.2 0.2", "0 0.5 0.5 0.0 0.3", "0 0.3 0.3 0.1 0.0",
                     "0 1.2 0.5 0.1 0.1")  # the last lies wholly outside: no area once clipped
    with caplog.at_level(logging.WARNING, logger="crossdet_ray.data"):
        dataset, (_, target) = _only_item(builder)
    assert target["boxes"].shape == (1, 4)
    assert target["labels"].tolist() == [1]
    assert dataset.num_boxes == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "3 zero-area boxes" in warnings[0].getMessage()


def test_frame_whose_boxes_are_all_dropped_yields_empty_target(builder):
    builder.labelled("a", "0 0.5 0.5 0.0 0.0")
    _, (_, target) = _only_item(builder)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_frames_without_labels_are_skipped(builder):
    builder.labelled("keep")
    builder.frame("no_label_file")
    builder.frame("empty_label")
    builder.label("empty_label")
    builder.frame("blank_lines")
    (builder.labels_dir / "blank_lines.txt").write_text("\n   \n\n")
    builder.label("label_without_frame", "0 0.5 0.5 0.1 0.1")
    dataset = NpyYoloDataset(builder.root, split="all")
    assert dataset.image_files == ["keep.npy"]


def test_num_classes_counts_all_frames_so_splits_agree(builder):
    for i in range(10):
        builder.labelled(f"f{i}")
    builder.labelled("f5", "4 0.5 0.5 0.1 0.1")  # class 4 in a single frame
    train = NpyYoloDataset(builder.root, split="train")
    test = NpyYoloDataset(builder.root, split="test")
    assert train.num_classes == test.num_classes == 5
    assert ("f5.npy" in train.image_files) != ("f5.npy" in test.image_files)


def test_frames_are_memory_mapped_and_items_are_copies(builder, monkeypatch):
    builder.labelled("a", height=16, width=16)
    calls = []
    real_load = np.load

    def spying_load(*args, **kwargs):
        calls.append(kwargs.get("mmap_mode"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(dataset_module.np, "load", spying_load)
    dataset = NpyYoloDataset(builder.root, split="all")
    assert calls == []  # construction reads headers only
    image, _ = dataset[0]
    assert calls == ["r"]
    image.fill_(0.5)  # writing the item must not touch the file
    assert real_load(builder.images / "a.npy").max() == 0


def test_dataset_holds_no_pixels(builder):
    for i in range(4):
        builder.labelled(f"f{i}", height=128, width=128)  # 80 KB of pixels each
    dataset = NpyYoloDataset(builder.root, split="all")
    assert len(pickle.dumps(dataset)) < 128 * 128 * 5 // 4


def test_transforms_receive_image_and_target(builder):
    builder.labelled("a", "0 0.25 0.5 0.2 0.4", height=10, width=20)

    def flip(image, target):
        flipped = target["boxes"].clone()
        flipped[:, [0, 2]] = image.shape[-1] - target["boxes"][:, [2, 0]]
        return image.flip(-1), {**target, "boxes": flipped}

    _, (_, target) = _only_item(builder, transforms=flip)
    assert target["boxes"].tolist() == [[13.0, 3.0, 17.0, 7.0]]


def test_collate_keeps_images_apart(builder):
    builder.labelled("a", height=10, width=20)
    builder.labelled("b", "0 0.5 0.5 0.2 0.2", "0 0.2 0.2 0.1 0.1", height=30, width=15)
    dataset = NpyYoloDataset(builder.root, split="all")
    images, targets = collate_detection([dataset[0], dataset[1]])
    assert isinstance(images, tuple) and isinstance(targets, tuple)
    assert [tuple(i.shape) for i in images] == [(5, 10, 20), (5, 30, 15)]
    assert [len(t["labels"]) for t in targets] == [1, 2]
    assert collate_detection([]) == ((), ())


def test_dataloader_with_collate(builder):
    for i in range(5):
        builder.labelled(f"f{i}", height=8 + i, width=8)
    loader = torch.utils.data.DataLoader(NpyYoloDataset(builder.root, split="all"),
                                         batch_size=2, collate_fn=collate_detection)
    assert [len(images) for images, _ in loader] == [2, 2, 1]


def test_unknown_split_is_rejected(builder):
    builder.labelled("a")
    with pytest.raises(ValueError, match="split"):
        NpyYoloDataset(builder.root, split="val")


def test_index_out_of_range(builder):
    builder.labelled("a")
    dataset = NpyYoloDataset(builder.root, split="all")
    with pytest.raises(IndexError):
        dataset[1]
    assert dataset[-1][0].shape == (5, 32, 32)


def test_fortran_order_and_big_endian_frames_load(builder):
    array = np.arange(6 * 7 * 5, dtype=np.uint16).reshape(6, 7, 5)
    builder.labelled("f_order", array=np.asfortranarray(array))
    builder.labelled("g_big_endian", array=array.astype(">u2"))
    dataset = NpyYoloDataset(builder.root, split="all")
    expected = torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32) / 65535)
    for index in range(2):
        assert torch.allclose(dataset[index][0], expected)
